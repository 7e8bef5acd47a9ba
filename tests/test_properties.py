"""Property-based tests (hypothesis): random shapes, dtypes and options, checked against the
float64 autograd reference of the naive formula (``reference.py``, ``layer_kinds.py``).

Properties, each for Linear, Conv1d/2d/3d and Embedding unless said otherwise:

1. forward (autograd and cached no-grad paths) and every gradient match the reference;
2. ``merge()`` reproduces the adapted output and ``unmerge()`` restores ``W`` to rounding;
3. ``apply_dora`` then ``merge_and_unload`` preserves a model's outputs (CNN, LLaMA);
4. ``save_adapter`` then ``load_adapter`` is bitwise, special values included.

The CI profile is derandomized and database-free, so every run checks the same examples; the
``slow`` variant of each test runs a larger campaign (``scripts/test -m slow``).

Tolerances. A float result is only as good as its dtype and the conditioning of its data allow.
Each error (an output relative to its norm; a gradient relative to the largest gradient term,
see ``errors``) is bounded by ``max(FLOOR, FACTOR·yardstick, FACTOR·u·κ²)``:

* the yardstick is the naive formula's own error on the same data in the same dtype (for
  float64: the float32 one scaled by the ratio of unit roundoffs ``u``);
* ``κ²`` (``conditioning``) covers the factored norm, which sums ``n²`` from terms as large as
  ``(‖W_i‖ + s·‖|B_i| |A|‖)²`` and so loses ``u·κ²`` on a row whose update cancels the weight,
  where the naive formula loses ``u·κ`` (docs/design.md §1.1's trade for never building
  ``W + sBA``);
* ``FLOOR`` is docs/design.md §3's 1e-10 / 1e-5 for float64 / float32, 8·u for the 16-bit types.

Measured over ~30k examples (the slow profile's strategies, every kind and dtype), the largest
error was 1.5× ``max(FLOOR, yardstick, u·κ²)``; ``FACTOR = 8`` leaves room for unseen examples
without hiding a wrong formula: a sign or factor mistake gives errors of order 1, and even a
1e-4 relative change of one term of ``n²`` fails. Left out (``assume``): examples where
``u·κ² > MAX_NORM_ERROR`` (no digits left in that dtype; ``test_numerics`` covers cancelling
updates) and float16 examples whose output before the ``m/n`` rescale overflows.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

from layer_kinds import naive_conv, naive_embedding, ours, randomize, reference
from model_zoo import build, example_inputs, output, perturb_adapters
from profiles import profiles, run_examples
from reference import naive_dora_linear, rel_err
from torchdora import (
    DoRAConfig,
    DoRAConv,
    DoRAEmbedding,
    DoRALayer,
    DoRALinear,
    apply_dora,
    merge_and_unload,
)
from torchdora.io import load_adapter, save_adapter
from torchdora.io.peft_format import peft_state_dict

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {dtype: torch.finfo(dtype).eps / 2 for dtype in DTYPES}
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 8 * UNIT_ROUNDOFF[torch.bfloat16],
    torch.float16: 8 * UNIT_ROUNDOFF[torch.float16],
}
FACTOR = 8.0
#: examples where the factored norm may lose more than this (u·κ², see ``conditioning``) keep
#: no meaningful digits in their dtype; they are left out here, ``test_numerics`` shows them
MAX_NORM_ERROR = 1 / 64


# --------------------------------------------------------------------------- random layers
@dataclass(frozen=True)
class LayerCase:
    """One random layer and input; ``make()`` builds them (deterministically from ``seed``)."""

    kind: str  # "linear" | "conv" | "embedding"
    dtype: torch.dtype
    options: dict  # DoRALayer options: rank, alpha, use_rslora, eps, dropout, detach_norm
    geometry: dict  # kind-specific sizes
    input_shape: tuple[int, ...]
    seed: int
    w_scale: float  # scale of the base weight
    b_std: float  # std of B: 0 is the init, large values give ‖sBA‖ ≫ ‖W‖
    train_bias: bool
    train_base: bool
    device: str = "cpu"  # the layer and input are built on the CPU, then moved here

    def make(self) -> tuple[nn.Module, torch.Tensor, Callable]:
        """``(layer, x, naive)``: the layer in eval mode (dropout off) and its reference."""
        torch.manual_seed(self.seed)
        base = self._base()
        with torch.no_grad():
            base.weight.normal_(std=self.w_scale)
            if getattr(base, "bias", None) is not None:
                base.bias.normal_()
        layer_type = {
            "linear": DoRALinear.from_linear,
            "conv": DoRAConv,
            "embedding": DoRAEmbedding,
        }
        layer = layer_type[self.kind](base, freeze_base=not self.train_base, **self.options)
        randomize(layer, b_std=self.b_std)
        if layer.bias is not None:
            layer.bias.requires_grad_(self.train_bias or self.train_base)
        layer.eval()
        if self.kind == "embedding":
            x = torch.randint(0, self.geometry["num_embeddings"], self.input_shape)
        else:
            x = torch.randn(self.input_shape, dtype=torch.float64).to(self.dtype)
        layer, x = layer.to(self.device), x.to(self.device)
        naive = {
            "linear": lambda _: naive_dora_linear,
            "conv": naive_conv,
            "embedding": naive_embedding,
        }[self.kind](base)
        return layer, x, naive

    def _base(self) -> nn.Module:
        g, dtype = self.geometry, self.dtype
        if self.kind == "linear":
            return nn.Linear(g["in"], g["out"], bias=g["bias"], dtype=dtype)
        if self.kind == "embedding":
            return nn.Embedding(
                g["num_embeddings"], g["dim"], padding_idx=g["padding_idx"], dtype=dtype
            )
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(g["kernel"])]
        return conv(
            g["in"],
            g["out"],
            g["kernel"],
            stride=g["stride"],
            padding=g["padding"],
            dilation=g["dilation"],
            groups=g["groups"],
            bias=g["bias"],
            padding_mode=g["padding_mode"],
            dtype=dtype,
        )


@st.composite
def adapter_options(draw) -> dict:
    return {
        "rank": draw(st.integers(1, 10)),  # above min(d_out, fan_in) often: sizes go to 1
        "alpha": draw(st.sampled_from([0.5, 1.0, 4.0, 16.0, 48.0])),
        "use_rslora": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-12, 1e-8, 1e-3])),
        "dropout": draw(st.sampled_from([0.0, 0.1, 0.5])),  # the layer is in eval mode
        "detach_norm": draw(st.booleans()),
    }


lead_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)  # () to 3 dims, 0 = empty


@st.composite
def layer_cases(draw, kind: str) -> LayerCase:
    common = {
        "dtype": draw(st.sampled_from(DTYPES)),
        "options": draw(adapter_options()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "w_scale": draw(st.sampled_from([0.01, 1.0, 30.0])),
        "b_std": draw(st.sampled_from([0.0, 0.05, 0.5, 3.0])),
        "train_bias": draw(st.booleans()),
        "train_base": draw(st.booleans()),
    }
    if kind == "linear":
        geometry = {"in": draw(st.integers(1, 12)), "out": draw(st.integers(1, 12))}
        geometry["bias"] = draw(st.booleans())
        input_shape = (*draw(lead_shapes), geometry["in"])  # 1-D to 4-D input, 0 tokens too
    elif kind == "embedding":
        num = draw(st.integers(1, 12))
        geometry = {
            "num_embeddings": num,
            "dim": draw(st.integers(1, 12)),
            "padding_idx": draw(st.none() | st.integers(0, num - 1)),
        }
        input_shape = draw(lead_shapes)  # indices of any shape, () and empty included
    else:
        geometry, input_shape = draw(conv_geometries())
    return LayerCase(kind, geometry=geometry, input_shape=input_shape, **common)


@st.composite
def conv_geometries(draw) -> tuple[dict, tuple[int, ...]]:
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2]))
    per_dim = st.lists(st.integers(1, 3), min_size=dims, max_size=dims).map(tuple)
    kernel = draw(per_dim)
    dilation = draw(per_dim.map(lambda d: tuple(min(v, 2) for v in d)))
    padding = draw(st.lists(st.integers(0, 1), min_size=dims, max_size=dims).map(tuple))
    geometry = {
        "in": groups * draw(st.integers(1, 3)),
        "out": groups * draw(st.integers(1, 3)),
        "kernel": kernel,
        "stride": draw(per_dim.map(lambda d: tuple(min(v, 2) for v in d))),
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(["zeros", "circular"])),
    }
    spatial = tuple(
        max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 2))
        for k, d, p in zip(kernel, dilation, padding, strict=True)
    )
    batch = draw(st.sampled_from([(), (0,), (1,), (2,)]))  # () is an unbatched input
    return geometry, (*batch, geometry["in"], *spatial)


all_layer_cases = st.one_of(layer_cases("linear"), layer_cases("conv"), layer_cases("embedding"))


# --------------------------------------------------------------------------- tolerances
def yardstick_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the naive formula is measured in: the layer's own, float32 for float64."""
    return torch.float32 if dtype == torch.float64 else dtype


def row_terms(layer) -> torch.Tensor:
    """``‖W_i‖ + s·‖(|B| |A|)_i‖``: the size of the terms summed into row ``i`` of ``W + sBA``."""
    W = layer.weight_matrix(layer.weight.detach().double())
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    return W.norm(dim=1) + layer.scaling * (B.abs() @ A.abs()).norm(dim=1)


def conditioning(layer) -> float:
    """``max_i κ_i²`` with ``κ_i = row_terms_i / ‖V_i‖``: the factored norm sums ``n²`` from
    terms as large as ``row_terms²``, so its relative error is of order ``u·κ²`` (the naive
    formula's is ``u·κ``): an update cancelling the weight costs it twice the digits."""
    V = layer.weight_matrix(layer.weight.detach().double())
    V = V + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    kappa = row_terms(layer) / V.norm(dim=1).clamp_min(layer.eps)
    return float(kappa.max()) ** 2 if kappa.numel() else 1.0


def bound(dtype: torch.dtype, yardstick_error: float, kappa_sq: float) -> float:
    """What an error in ``dtype`` may reach, given the naive formula's error on the same data
    and the conditioning of the factored norm."""
    unit = UNIT_ROUNDOFF[dtype]
    scaled = yardstick_error * unit / UNIT_ROUNDOFF[yardstick_dtype(dtype)]
    return max(FLOOR[dtype], FACTOR * scaled, FACTOR * unit * kappa_sq)


def errors(got: dict, ref: dict, ref_detached: dict) -> dict[str, float]:
    """Relative error of each tensor; gradients relative to the largest gradient term.

    A gradient is the sum of the low-rank branch's term (the gradient with the norm detached)
    and the norm's; where they cancel (``fan_in = 1``: a row's direction is only its sign,
    so ``A``, ``B`` get exactly zero) the rounding is relative to the terms, not the sum.
    """
    terms = [*ref.values(), *ref_detached.values()]
    scale = max((float(g.double().norm()) for g in terms), default=0.0)
    return {name: rel_err(got[name], ref[name], floor=scale) for name in ref}


def direction_fits(layer, x, naive, dtype: torch.dtype) -> bool:
    """Whether ``W x + s·B A x`` (the output before the ``m/n`` rescale) is well inside
    ``dtype``'s range. float16 overflows there first, into inf (loud, not wrong digits)."""
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    V = layer.weight_matrix(W) + layer.scaling * B @ A
    norm = V.norm(dim=1).clamp_min(layer.eps)  # m = n: the naive output is the direction
    x = x.double() if x.is_floating_point() else x
    direction = naive(x, W, None, A, B, norm, layer.scaling, layer.eps, False)
    return float(direction.abs().max()) < torch.finfo(dtype).max / 8 if direction.numel() else True


# --------------------------------------------------------------------------- properties
def check_forward_and_gradients(case: LayerCase) -> None:
    layer, x, naive = case.make()
    kappa_sq = conditioning(layer)
    assume(UNIT_ROUNDOFF[case.dtype] * kappa_sq <= MAX_NORM_ERROR)
    assume(direction_fits(layer, x, naive, case.dtype))
    detach = case.options["detach_norm"]
    with torch.no_grad():
        cached = layer(x)  # the no-grad path (cached m/n) first
    grad_out = torch.randn(cached.shape, dtype=torch.float64, device=cached.device)
    ref_out, ref_grads = reference(layer, x, naive, grad_out, detach)
    _, ref_detached = reference(layer, x, naive, grad_out, detach_norm=True)
    low = yardstick_dtype(case.dtype)
    naive_out, naive_grads = reference(layer, x, naive, grad_out, detach, dtype=low)
    out, got = ours(layer, x, grad_out)

    assert out.dtype == cached.dtype == case.dtype
    assert out.shape == ref_out.shape
    assert set(got) == set(ref_grads), (set(got), set(ref_grads))
    out_bound = bound(case.dtype, rel_err(naive_out, ref_out), kappa_sq)
    assert rel_err(out, ref_out) <= out_bound, "forward"
    assert rel_err(cached, ref_out) <= out_bound, "no-grad forward"
    naive_errors = errors(naive_grads, ref_grads, ref_detached)
    for name, error in errors(got, ref_grads, ref_detached).items():
        assert error <= bound(case.dtype, naive_errors[name], kappa_sq), f"gradient of {name}"


def check_merge_unmerge(case: LayerCase) -> None:
    layer, x, naive = case.make()
    assume(direction_fits(layer, x, naive, case.dtype))
    W = layer.weight.detach().clone()
    with torch.no_grad():
        ref_out, _ = reference(layer, x, naive)
        naive_out, _ = reference(layer, x, naive, dtype=yardstick_dtype(case.dtype))
        layer.merge()
        merged_out = layer.base_layer(x)
        layer.unmerge()
    # merged: W' = (m/n)·V rounded once to the dtype, then the plain op (the naive formula)
    merged_bound = bound(case.dtype, rel_err(naive_out, ref_out), 1.0)
    assert rel_err(merged_out, ref_out) <= merged_bound, "merged forward"
    # unmerged: W'·(n/m) − sBA, with W' rounded relative to V, sBA and the result rounded
    # relative to the terms they sum: a few units of roundoff times row_terms per row.
    restored = layer.weight_matrix(layer.weight.detach().double())
    row_error = (restored - layer.weight_matrix(W.double())).norm(dim=1)
    assert bool((row_error <= 4 * UNIT_ROUNDOFF[case.dtype] * row_terms(layer)).all()), "unmerge"


@profiles
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_forward_and_gradients_match_reference(profile, kind):
    run_examples(profile, layer_cases(kind), check_forward_and_gradients, examples=150)


@profiles
def test_merge_unmerge_is_identity_to_rounding(profile):
    run_examples(profile, all_layer_cases, check_merge_unmerge, examples=150)


# --------------------------------------------------------------------------- whole models
#: zoo model → modules a random config may target or save (Linear, Conv1d/2d, Embedding)
MODEL_MODULES = {
    "cnn": ["conv1", "conv2", "conv3", "fc", "head"],
    "llama": ["embed_tokens", "q_proj", "v_proj", "o_proj", "down_proj", "lm_head"],
}


@dataclass(frozen=True)
class ModelCase:
    name: str
    dtype: torch.dtype
    config: dict  # DoRAConfig arguments
    seed: int
    perturbation: float  # std of B (and of the modules-to-save updates)
    device: str = "cpu"  # the model and inputs are built on the CPU, then moved here


@st.composite
def model_cases(draw, dtypes: list[torch.dtype], peft_format: bool = False) -> ModelCase:
    name = draw(st.sampled_from(sorted(MODEL_MODULES)))
    candidates = MODEL_MODULES[name]
    if peft_format:  # PEFT's format cannot hold a grouped convolution's adapter
        candidates = [c for c in candidates if c != "conv2"]
    targets = draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True))
    others = [c for c in candidates if c not in targets]
    config = {
        "target_modules": targets,
        "rank": draw(st.integers(1, 6)),
        "alpha": draw(st.sampled_from([1.0, 8.0, 32.0])),
        "use_rslora": draw(st.booleans()),
        "use_dora": draw(st.sampled_from([True, True, False])),
        "bias": draw(st.sampled_from(["none", "all", "dora_only"])),
        "modules_to_save": draw(st.lists(st.sampled_from(others), unique=True)) or None
        if others
        else None,
    }
    return ModelCase(
        name,
        draw(st.sampled_from(dtypes)),
        config,
        seed=draw(st.integers(0, 2**31 - 1)),
        perturbation=draw(st.sampled_from([0.01, 0.3, 1.0])),
    )


@contextmanager
def rank_above_size_allowed() -> Iterator[None]:
    """Silence ``apply_dora``'s warning about a rank above a layer's size (allowed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "rank exceeds", UserWarning)
        yield


def adapted_model(case: ModelCase) -> tuple[nn.Module, dict]:
    """The zoo model adapted per ``case`` with random adapters, in its dtype, and its inputs."""
    with rank_above_size_allowed():
        model = apply_dora(build(case.name, seed=0), DoRAConfig(**case.config))
    torch.manual_seed(case.seed)
    perturb_adapters(model, std=case.perturbation)
    inputs = {
        k: (v.to(case.dtype) if v.is_floating_point() else v).to(case.device)
        for k, v in example_inputs(case.name).items()
    }
    return model.to(case.device, case.dtype).eval(), inputs


def check_merge_and_unload(case: ModelCase) -> None:
    model, inputs = adapted_model(case)
    with torch.no_grad():
        expected = output(model, inputs)
        merged = output(merge_and_unload(model), inputs)
    assert not any(isinstance(m, DoRALayer) for m in model.modules())
    assert rel_err(merged, expected) <= FLOOR[case.dtype]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Values a lossy round trip would change: −0, a subnormal, the extremes, ε."""
    info = torch.finfo(dtype)
    values = [-0.0, info.smallest_normal / 2**3, -info.tiny, info.max, -info.max, info.eps]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so −0.0 ≠ 0.0, and NaNs compare by payload)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def check_save_then_load(case: ModelCase) -> None:
    model, inputs = adapted_model(case)
    with torch.no_grad():  # special values into every adapter factor
        for name, param in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")) and param.numel() >= 6:
                param.view(-1)[:6] = special_values(param.dtype)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder)
        with rank_above_size_allowed():
            loaded = load_adapter(build(case.name, seed=0).to(case.dtype), folder)
    loaded = loaded.to(case.dtype).eval()
    before, after = peft_state_dict(model), peft_state_dict(loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert same_bits(before[key], after[key]), key
    with torch.no_grad():
        assert same_bits(output(model, inputs), output(loaded, inputs))


@profiles
def test_merge_and_unload_preserves_outputs(profile):
    run_examples(
        profile, model_cases([torch.float64, torch.float32]), check_merge_and_unload, examples=40
    )


@profiles
def test_save_then_load_is_bitwise(profile):
    run_examples(profile, model_cases(DTYPES, peft_format=True), check_save_then_load, examples=40)
