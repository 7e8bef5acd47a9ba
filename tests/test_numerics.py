"""Numerical edge cases: zero rows, huge and cancelling updates, tiny eps, huge magnitudes,
NaN/Inf in inputs and in loaded adapters, and the finiteness guards (``torchdora.model.checks``).

Where the maths has an answer the layers are compared with the float64 naive reference
(``layer_kinds``); where it has none (NaN inputs) the behaviour is the documented one: NaN and
Inf propagate exactly as through the plain layer holding the adapted weight, so only the
affected outputs, and every gradient they reach, are non-finite. A known defect not fixed
yet would be ``xfail(strict=True)``: fixing it turns its test into a failure until the marker
goes.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layer_kinds import (
    TOL,
    assert_matches_reference,
    naive_conv,
    naive_embedding,
    randomize,
    reference,
)
from model_zoo import build, example_inputs, output, perturb_adapters
from reference import naive_dora_linear, rel_err
from torchdora import (
    DoRAConfig,
    DoRAConv,
    DoRAEmbedding,
    DoRALinear,
    LoRALinear,
    NonFiniteError,
    apply_dora,
    assert_finite,
    check_finite_outputs,
    dora_modules,
)
from torchdora.io import AdapterFileError, load_adapter, save_adapter
from torchdora.layers.adapter import MIN_EPS

KINDS = ["linear", "conv", "embedding"]
EXACT = [torch.float64, torch.float32]  # the dtypes layer_kinds.TOL holds to


def make_layer(kind: str, dtype: torch.dtype, rank: int = 3, **options):
    """``(layer, x, naive)``: a small random layer of ``kind`` (6 rows), an input, its reference."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x, naive = nn.Linear(8, 6, dtype=dtype), torch.randn(4, 8), naive_dora_linear
        layer = DoRALinear.from_linear(base, rank=rank, alpha=2.0 * rank, **options)
    elif kind == "conv":
        base, x = nn.Conv2d(3, 6, 3, padding=1, dtype=dtype), torch.randn(2, 3, 5, 5)
        layer, naive = DoRAConv(base, rank=rank, alpha=2.0 * rank, **options), naive_conv(base)
    else:
        base, x = nn.Embedding(10, 6, dtype=dtype), torch.randint(0, 10, (3, 4))
        layer = DoRAEmbedding(base, rank=rank, alpha=2.0 * rank, **options)
        naive = naive_embedding(base)
    with torch.no_grad():
        base.weight.normal_()
        if getattr(base, "bias", None) is not None:
            base.bias.normal_()
    randomize(layer)
    return layer, (x.to(dtype) if x.is_floating_point() else x), naive


def output_rows(layer, out: torch.Tensor, row: int) -> torch.Tensor:
    """The outputs that row ``row`` of the layer's matrix produces (a channel for convs)."""
    return out[:, row] if isinstance(layer, DoRAConv) else out[..., row]


# --------------------------------------------------------------------------- zero rows
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", EXACT)
@pytest.mark.parametrize("case", ["as-initialised", "update-only", "floored"])
def test_zero_row_of_weight(kind, dtype, case):
    """A zero row of W: as initialised (B row 0, m = 0), with a norm from the update alone, or
    with nothing at all but m ≠ 0 (n floored at eps): reference output and gradients."""
    layer, x, naive = make_layer(kind, dtype)
    with torch.no_grad():
        layer.weight_matrix()[2].zero_()
        if case != "update-only":
            layer.lora_B[2].zero_()
        if case == "as-initialised":
            layer.magnitude[2] = 0.0
    assert_matches_reference(layer, x, naive, dtype)
    if case != "update-only":  # nothing but the bias is left of that row
        with torch.no_grad():
            bias = 0.0 if layer.bias is None else layer.bias[2]
            assert bool((output_rows(layer, layer(x), 2) == bias).all())


# --------------------------------------------------------------------------- large updates
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", EXACT)
def test_update_a_million_times_the_weight(kind, dtype):
    """‖sBA_i‖ ≈ 1e6·‖W_i‖: the quadratic term dominates n² and nothing cancels."""
    layer, x, naive = make_layer(kind, dtype)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
        layer.lora_B.mul_(1e3)
    assert_matches_reference(layer, x, naive, dtype)


def cancelling_layer(dtype: torch.dtype, seed: int) -> tuple[DoRALinear, torch.Tensor]:
    """A layer whose update cancels its weight exactly in exact arithmetic: s·B·A = −W."""
    torch.manual_seed(seed)
    layer = DoRALinear(16, 8, rank=16, alpha=16.0, dtype=dtype)  # s = 1, A square
    with torch.no_grad():
        layer.base_layer.weight.normal_()
        layer.lora_A.normal_()
        inverse = torch.linalg.inv(layer.lora_A.double())
        layer.lora_B.copy_(-(layer.base_layer.weight.double() @ inverse))
        layer.magnitude.uniform_(0.5, 2.0)
    return layer, torch.randn(4, 16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_cancelling_the_weight_stays_finite(dtype):
    """n² is clamped at 0 before the floor: finite outputs and gradients, whatever rounding
    leaves of the rows."""
    for seed in range(5):
        layer, x = cancelling_layer(dtype, seed)
        x.requires_grad_()
        out = layer(x)
        out.float().square().sum().backward()
        assert torch.isfinite(out).all()
        assert_finite(layer)
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_cancelling_the_weight_keeps_output_within_magnitude(dtype):
    """|y_i − b_i| = |m_i|·|V_i x|/‖V_i‖ ≤ |m_i|·‖x‖ (Cauchy–Schwarz), however V_i rounds."""
    for seed in range(20):
        layer, x = cancelling_layer(dtype, seed)
        limit = layer.magnitude.double().abs() * x.double().norm(dim=-1, keepdim=True)
        with torch.no_grad():
            cached = layer(x)
        for out in (cached, layer(x)):  # the cached no-grad m/n, and autograd's forward
            direction = (out - layer.bias).double().abs()
            assert bool((direction <= 1.01 * limit).all()), seed


# --------------------------------------------------------------------------- eps
@pytest.mark.parametrize("eps", [1e-30, 0.0, -1.0, float("inf"), float("nan")])
def test_eps_whose_square_underflows_is_refused(eps):
    for make in (
        lambda: DoRALinear(4, 3, eps=eps),
        lambda: DoRAConv(nn.Conv1d(2, 3, 1), eps=eps),
        lambda: DoRAEmbedding(nn.Embedding(5, 3), eps=eps),
        lambda: DoRAConfig(eps=eps),
    ):
        with pytest.raises(ValueError, match="eps must be finite and >="):
            make()


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0.0])
def test_non_finite_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be finite"):
        DoRALinear(4, 3, alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be finite"):
        DoRAConfig(alpha=alpha)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_smallest_eps_floors_a_zero_row(kind, dtype):
    """eps = MIN_EPS on a row with nothing left (W_i = 0, B_i = 0, m_i ≠ 0): the floor holds in
    float32 and the row gives its bias; everything stays finite."""
    layer, x, naive = make_layer(kind, dtype, eps=MIN_EPS)
    with torch.no_grad():
        layer.weight_matrix()[2].zero_()
        layer.lora_B[2].zero_()
    if dtype in EXACT:
        assert_matches_reference(layer, x, naive, dtype)
    out = layer(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert_finite(layer)


# --------------------------------------------------------------------------- magnitudes
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", EXACT)
def test_huge_magnitude_is_exact_until_the_output_overflows(kind, dtype):
    """m ≈ 1e30 (1e150 in float64) is just a scale; with m near the dtype's largest value, the
    outputs whose true value exceeds the range are ±inf, and only those (as the plain layer
    with W' gives). An embedding's outputs are at most |m|: they cannot overflow."""
    layer, x, naive = make_layer(kind, dtype)
    with torch.no_grad():
        layer.magnitude.mul_(1e30 if dtype == torch.float32 else 1e150)
    assert_matches_reference(layer, x, naive, dtype)
    if kind == "embedding":
        return
    limit, x = torch.finfo(dtype).max, 8 * x  # |V_i x| / ‖V_i‖ up to ‖x‖ ≈ 20
    with torch.no_grad():
        layer.magnitude.mul_(0.5 * limit / float(layer.magnitude.abs().max()))
        ref, _ = reference(layer, x, naive)
        out = layer(x)
    clear = (ref.abs() > 1.01 * limit) | (ref.abs() < 0.99 * limit)  # away from the edge
    assert bool((~torch.isfinite(out) == (ref.abs() > limit))[clear].all())
    assert (~torch.isfinite(out)).any() and torch.isfinite(out).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["large-ratio", "floored-zero-row"])
def test_float16_scale_above_range_with_representable_output(kind, case):
    """float16 ends at 65504; m/n may pass it on a small-norm row while the output fits.

    (The backward's ``g ⊙ m/n`` on such a row is beyond float16 itself; a gradient scaler
    then skips the step, as for any float16 overflow.)
    """
    layer, x, naive = make_layer(kind, torch.float16)
    with torch.no_grad():
        if case == "large-ratio":  # ‖V_2‖ ≈ 3e-4, m_2 = 100: m/n ≈ 3e5, outputs ≈ 100·|x|
            layer.weight_matrix()[2].mul_(1e-4)
            layer.lora_B[2].zero_()
            layer.magnitude[2] = 100.0
        else:  # nothing left of row 2 but m_2: the output row is its bias
            layer.weight_matrix()[2].zero_()
            layer.lora_B[2].zero_()
    ref, _ = reference(layer, x, naive)
    with torch.no_grad():
        cached = layer(x)
    for got in (cached, layer(x)):  # the no-grad path with its cached m/n, and autograd's
        assert got.dtype == torch.float16
        assert rel_err(got, ref) <= 2e-3  # float16's own rounding: u = 4.9e-4


def test_float16_gradient_of_B_survives_a_large_scale():
    """m/n ≈ 3e4 on a 1-wide float16 layer: the direction path's ``(g ⊙ m/n)ᵀ(A x)`` passes
    65504 while the norm path's float32 term cancels it (with d_in = 1 the direction is ±1, so
    the gradient of B is ~0): the sum must be formed before anything rounds to float16."""
    torch.manual_seed(1)
    layer = DoRALinear(1, 10, rank=10, alpha=16.0, bias=False, dtype=torch.float16, eps=1e-12)
    with torch.no_grad():
        layer.base_layer.weight.fill_(3e-5)
        layer.refresh_weight_norm()
        layer.magnitude.fill_(1.0)
        layer.lora_A.fill_(3.0)
    layer(torch.full((1, 1), -1.93, dtype=torch.float16)).backward(torch.ones(1, 10).half())
    assert_finite(layer)


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("path", ["no-grad", "autograd", "detached-norm", "lora"])
def test_empty_input_like_nn_linear(path):
    """nn.Linear maps a (0, in) input to (0, out); so must the DoRA and LoRA layers."""
    layer_type = LoRALinear if path == "lora" else DoRALinear
    layer = layer_type(5, 3, rank=2, detach_norm=path == "detached-norm")
    x = torch.zeros(0, 5, requires_grad=path != "no-grad")
    with torch.set_grad_enabled(path != "no-grad"):
        out = layer(x)
    assert out.shape == layer.base_layer(x).shape == (0, 3)
    if path != "no-grad":
        out.sum().backward()
        assert x.grad.shape == (0, 5) and bool((layer.lora_A.grad == 0).all())


# --------------------------------------------------------------------------- NaN/Inf inputs
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_propagates_like_the_plain_layer(kind, value):
    """Non-finite exactly where the naive formula (a plain layer with the adapted weight) is;
    the other outputs exact; the cached no-grad scale is not poisoned; gradients that the
    poisoned outputs reach are flagged by assert_finite."""
    layer, x, naive = make_layer(kind, torch.float64)
    poisoned = x.clone()
    poisoned.view(-1)[5] = value
    ref, _ = reference(layer, poisoned, naive)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = layer(poisoned)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(out), finite)
        assert not finite.all() and rel_err(out[finite], ref[finite]) <= TOL[torch.float64]
    with torch.no_grad():  # a clean input afterwards, through the cached scale
        assert rel_err(layer(x), reference(layer, x, naive)[0]) <= TOL[torch.float64]
    layer(poisoned).sum().backward()
    with pytest.raises(NonFiniteError, match=r"lora_B \(gradient\): NaN"):
        assert_finite(layer)


def test_out_of_range_index_fails_like_nn_embedding():
    layer, _, _ = make_layer("embedding", torch.float32)
    for bad in (torch.tensor([10]), torch.tensor([-11])):
        with pytest.raises(IndexError):
            layer.base_layer(bad)
        with pytest.raises(IndexError):
            layer(bad)


# --------------------------------------------------------------------------- loaded adapters
ADAPTER_CONFIG = DoRAConfig(
    target_modules=["q_proj", "v_proj"], rank=4, modules_to_save=["lm_head"]
)
ADAPTER_KEYS = {  # one key of each kind such an adapter holds
    "lora_A": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "lora_B": "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    "magnitude": "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector",
    "saved-module": "base_model.model.lm_head.weight",
}


@pytest.fixture
def peft_style_adapter(tmp_path):
    """A saved llama adapter, rewritten without torchdora's metadata (as PEFT writes files), so
    the value checks are reached rather than the checksum."""
    model = apply_dora(build("llama"), ADAPTER_CONFIG)
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights)
    return tmp_path


def _poison(folder, key: str, value: float) -> None:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[key].view(-1)[3] = value
    save_file(tensors, weights)


@pytest.mark.parametrize("which", list(ADAPTER_KEYS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("into", ["fresh-model", "adapted-model"])
def test_non_finite_adapter_is_refused_and_model_kept(peft_style_adapter, which, value, into):
    key = ADAPTER_KEYS[which]
    _poison(peft_style_adapter, key, value)
    model = build("llama")
    if into == "adapted-model":
        apply_dora(model, ADAPTER_CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=re.escape(f"{key} holds NaN or Inf values")):
        load_adapter(model, peft_style_adapter)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_value_overflowing_the_model_dtype_is_refused(peft_style_adapter):
    """A finite float32 value that float16 cannot hold would load as inf: refused."""
    key = ADAPTER_KEYS["saved-module"]
    _poison(peft_style_adapter, key, 1e6)
    with pytest.raises(AdapterFileError, match=re.escape(f"{key} holds values too large for")):
        load_adapter(build("llama").half(), peft_style_adapter)


def test_poisoned_torchdora_file_fails_its_checksum(tmp_path):
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj"], rank=4))
    save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with open(weights, "rb") as f:
        data = bytearray(f.read())
    data[-4:] = torch.tensor([float("nan")]).view(torch.uint8).numpy().tobytes()
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="corrupt"):
        load_adapter(build("llama"), tmp_path)


# --------------------------------------------------------------------------- guards
def adapted_llama() -> nn.Module:
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"], rank=4))
    perturb_adapters(model)
    return model


def test_assert_finite_names_parameters_and_gradients():
    model = adapted_llama()
    assert_finite(model)  # healthy: silent
    output(model, example_inputs("llama")).sum().backward()
    assert_finite(model)
    name = "model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(name)
    with torch.no_grad():
        layer.lora_A.grad[0, 0] = float("inf")
    where = rf"{name}\.adapters\.default\.lora_A"
    with pytest.raises(NonFiniteError, match=rf"{where} \(gradient\): Inf"):
        assert_finite(model)
    assert_finite(model, gradients=False)
    with torch.no_grad():
        layer.magnitude[1] = float("nan")
        model.model.layers[0].self_attn.q_proj.lora_B[0, 0] = float("-inf")
    with pytest.raises(NonFiniteError) as err:
        assert_finite(model, gradients=False)
    assert "layers.0.self_attn.q_proj.adapters.default.lora_B: Inf" in str(err.value)
    assert f"{name}.adapters.default.magnitude: NaN" in str(err.value)


def test_check_finite_outputs_names_the_layer_that_produced_nan():
    model = adapted_llama()
    inputs = example_inputs("llama")
    with check_finite_outputs(model):
        output(model, inputs)  # healthy: silent
        name = "model.layers.1.self_attn.v_proj"
        with torch.no_grad():
            model.get_submodule(name).magnitude[0] = float("inf")
        with pytest.raises(
            NonFiniteError, match=rf"{name} \(DoRALinear\) holds .*inputs are finite"
        ):
            output(model, inputs)
    output(model, inputs)  # the hooks are gone


def test_check_finite_outputs_says_when_the_input_was_already_bad():
    layer, x, _ = make_layer("linear", torch.float32)
    model = nn.Sequential(nn.Identity(), layer)
    x[0, 0] = float("nan")
    guard = check_finite_outputs(model)
    with pytest.raises(NonFiniteError, match=r"output of 0 \(Identity\) holds NaN; its input"):
        model(x)
    guard.remove()
    assert [name for name, _ in dora_modules(model)] == ["1"]
    assert not torch.isfinite(model(x)).all()
