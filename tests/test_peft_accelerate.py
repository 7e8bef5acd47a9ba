"""accelerate_peft on one PEFT layer of each kind: PEFT's own numbers (outputs and gradients,
with and without dropout), the full gradient against a float64 reference, the same tensors,
restore_peft, and what it refuses or leaves to PEFT."""

from __future__ import annotations

import copy
import importlib.metadata
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdora
from peft_twins import KINDS, One, dora_model, layer_model, lora_grads, twins
from reference import rel_err
from torchdora.quantization import QUANTIZATION_METHODS, quantize_linear

peft = pytest.importorskip("peft")
from peft.tuners.lora import variants as peft_variants  # noqa: E402

FLOAT32 = 1e-5


def run(model: nn.Module, kind: str, x: torch.Tensor, seed: int = 3):
    """Output and the gradients of ``x`` (if float) and of every LoRA parameter for a fixed
    random upstream gradient; dropout drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x.is_floating_point())
    torch.manual_seed(seed)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    grads = lora_grads(model)
    if x.is_floating_point():
        grads["x"] = x.grad
    return out.detach(), grads


def assert_close(ours, theirs, tol: float) -> None:
    out_a, grads_a = ours
    out_b, grads_b = theirs
    assert rel_err(out_a, out_b) <= tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        assert rel_err(grads_a[name], grads_b[name], floor=1e-6) <= tol, name


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_each_kind_gives_peft_outputs_and_gradients(kind, dropout):
    plain, accelerated = twins(layer_model(kind, dropout=dropout))
    plain.train(), accelerated.train()
    x = KINDS[kind][1]()
    theirs = run(plain, kind, x)
    assert_close(run(accelerated, kind, x), theirs, FLOAT32)
    plain.eval(), accelerated.eval()  # no dropout: the base output is shared
    with torch.no_grad():
        assert rel_err(accelerated(x), plain(x)) <= FLOAT32


class FixedMask(nn.Module):
    """Dropout with a mask fixed in advance, so a reference can apply the same one."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def reference_output(model: nn.Module, kind: str, x: torch.Tensor, mask) -> torch.Tensor:
    """PEFT's DoRA forward, written from the maths on dense float64 matrices with the norm NOT
    detached: ``W x + b + (m/n − 1) ⊙ W x_d + (m/n)·s·ΔW x_d`` (``x_d = x`` without dropout)."""
    layer = model.base_model.model.layer
    base = layer.get_base_layer()
    s = layer.scaling["default"]
    m = layer.lora_magnitude_vector["default"].weight.reshape(-1)
    if kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        V = base.weight.T + s * B @ A  # d × vocab
        return F.embedding(x, ((m / V.norm(dim=1)).unsqueeze(1) * V).T)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    rank = A.shape[0]
    if kind in ("linear", "gpt2-conv1d"):
        W = base.weight.T if kind == "gpt2-conv1d" else base.weight
        delta = B @ A
        apply = lambda w, inp, bias=None: F.linear(inp, w, bias)  # noqa: E731
    else:
        W = base.weight
        delta = (B.reshape(-1, rank) @ A.reshape(rank, -1)).reshape(W.shape)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[W.dim()]

        def apply(w, inp, bias=None):
            return conv(inp, w, bias, base.stride, base.padding)

    V = W + s * delta
    scale = m / V.flatten(1).norm(dim=1)
    scale = scale.view(-1, *([1] * (W.dim() - 2)))
    x_d = x if mask is None else x * mask
    out = apply(W, x, base.bias) + (scale - 1) * apply(W, x_d) + scale * s * apply(delta, x_d)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dropped", [False, True])
def test_exact_gradient_equals_float64_reference(kind, dropped):
    model = layer_model(kind, dropout=0.5 if dropped else 0.0).double().train()
    torchdora.accelerate_peft(model, exact_gradient=True)
    x = KINDS[kind][1]()
    x = x.double() if x.is_floating_point() else x
    mask = None
    if dropped and kind != "embedding":  # PEFT's DoRA has no dropout on embeddings
        mask = (torch.rand(x.shape) > 0.5).double() * 2
        model.base_model.model.layer.lora_dropout["default"] = FixedMask(mask)
    ours = run(model, kind, x)
    ref_model = copy.deepcopy(model)
    ref_model.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_(x.is_floating_point())
    out = reference_output(ref_model, kind, x_ref, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    theirs = lora_grads(ref_model)
    if x.is_floating_point():
        theirs["x"] = x_ref.grad
    assert_close(ours, (out.detach(), theirs), 1e-10)


def test_the_same_tensors_train_and_state_dict_keys_stay():
    model = layer_model("linear")
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torchdora.accelerate_peft(model)
    assert dict(model.named_parameters()) == before  # the same Parameter objects
    assert list(model.state_dict()) == keys
    magnitude = model.base_model.model.layer.lora_magnitude_vector["default"].weight
    start = magnitude.detach().clone()
    model(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(magnitude, start)


def test_restore_puts_peft_variants_back_and_outputs_stay():
    model = layer_model("linear", dropout=0.2)
    layer = model.base_model.model.layer
    original = layer.lora_variant["default"]
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = model.eval()(x)
    torchdora.accelerate_peft(model)
    assert type(layer.lora_variant["default"]).__module__.startswith("torchdora")
    assert isinstance(layer.lora_variant["default"], peft_variants.DoraLinearVariant)
    assert torchdora.restore_peft(model) is model
    assert layer.lora_variant["default"] is original
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    torchdora.restore_peft(model)  # never accelerated now: unchanged
    assert layer.lora_variant["default"] is original


def test_calling_again_switches_the_gradient_and_keeps_peft_variant():
    model = layer_model("linear")
    layer = model.base_model.model.layer
    original = layer.lora_variant["default"]
    torchdora.accelerate_peft(model)
    torchdora.accelerate_peft(model, exact_gradient=True)
    assert layer.lora_variant["default"].exact_gradient
    assert layer.lora_variant["default"].peft_variant is original


def test_a_trainable_base_weight_runs_peft_code():
    plain, accelerated = twins(layer_model("linear"))
    for model in (plain, accelerated):
        model.base_model.model.layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(4, 12)
    ours, theirs = run(accelerated, "linear", x), run(plain, "linear", x)
    assert_close(ours, theirs, 0.0)  # PEFT's code, bit for bit
    weight = lambda m: m.base_model.model.layer.base_layer.weight.grad  # noqa: E731
    assert torch.equal(weight(accelerated), weight(plain))


def test_refuses_a_model_without_peft_layers():
    with pytest.raises(TypeError, match=r"expects a PEFT model with LoRA layers.*apply_dora"):
        torchdora.accelerate_peft(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="restore_peft expects a PEFT model"):
        torchdora.restore_peft(nn.Linear(3, 3))


def test_refuses_a_peft_version_outside_the_range(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.99.0" if name == "peft" else real(name)
    )
    with pytest.raises(RuntimeError, match=r"supports peft 0\.\d+ to 0\.\d+\.x, found peft 0\.99"):
        torchdora.accelerate_peft(layer_model("linear"))


def test_names_the_extra_when_peft_is_missing(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match=r"pip install 'torchdora\[peft\]'"):
        torchdora.accelerate_peft(layer_model("linear"))


def test_rejects_a_non_bool_exact_gradient():
    with pytest.raises(TypeError, match="exact_gradient must be a bool"):
        torchdora.accelerate_peft(layer_model("linear"), exact_gradient="yes")


def test_warns_when_there_is_no_dora_adapter():
    model = peft.get_peft_model(One(nn.Linear(4, 4)), peft.LoraConfig(target_modules=["layer"]))
    with pytest.warns(UserWarning, match="no DoRA adapter"):
        torchdora.accelerate_peft(model)


def grouped_conv_model() -> nn.Module:
    return dora_model(One(nn.Conv2d(4, 4, 3, groups=2)), ["layer"], r=2)


def unknown_variant_model() -> nn.Module:
    model = layer_model("linear")
    layer = model.base_model.model.layer

    class OwnVariant(peft_variants.DoraLinearVariant):
        """A DoRA variant of someone else's, which torchdora cannot know the maths of."""

    layer.lora_variant["default"] = OwnVariant()
    return model


@pytest.mark.parametrize(
    ("build", "inputs", "reason"),
    [
        (grouped_conv_model, lambda: torch.randn(2, 4, 6, 6), "groups > 1"),
        (unknown_variant_model, lambda: torch.randn(3, 12), "variant OwnVariant is not one"),
    ],
)
def test_what_it_cannot_compute_stays_peft_and_is_named_once(build, inputs, reason):
    model = build()
    x = inputs()
    with torch.no_grad():
        expected = model.eval()(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchdora.accelerate_peft(model)
    messages = [str(w.message) for w in caught if "accelerate_peft" in str(w.message)]
    assert len(messages) == 1
    assert "1 of 1 DoRA adapters stay on PEFT's own code" in messages[0]
    assert "layer (adapter 'default')" in messages[0] and reason in messages[0]
    assert not type(model.base_model.model.layer.lora_variant["default"]).__module__.startswith(
        "torchdora"
    )
    with torch.no_grad():
        assert torch.equal(model(x), expected)


#: PEFT's own DoRA cannot dequantize torchao's NF4 weights (NF4Tensor.dequantize() takes other
#: arguments), so there is nothing of PEFT's to compare with there.
PEFT_QUANTIZED = [m for m in QUANTIZATION_METHODS if m != "torchao-nf4"]


@pytest.mark.parametrize("method", PEFT_QUANTIZED)
@pytest.mark.parametrize("marked", [False, True], ids=["in-lora-Linear", "in-peft-quantized-layer"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_quantized_bases_give_peft_outputs_and_gradients(method, marked, dropout):
    """PEFT's QDoRA (bitsandbytes, torchao): in PEFT's own quantized layer classes (a model
    marked as loaded in 4/8 bits) and in its plain Linear (a model that is not)."""
    pytest.importorskip("bitsandbytes" if method.startswith("bnb") else "torchao")
    torch.manual_seed(0)
    base = One(quantize_linear(nn.Linear(256, 128), method))
    if marked:
        base.is_loaded_in_8bit = method == "bnb-int8"
        base.is_loaded_in_4bit = method in ("bnb-nf4", "bnb-fp4")
    model = dora_model(base, ["layer"], r=4, lora_dropout=dropout)
    plain, accelerated = twins(model)
    x = torch.randn(3, 5, 256)
    for run_model in (plain, accelerated):
        run_model.train()
    assert_close(run(accelerated, "linear", x), run(plain, "linear", x), FLOAT32)
    variant = accelerated.base_model.model.layer.lora_variant["default"]
    assert type(variant).__name__ == "QuantizedDoraLinearVariant"


def test_a_bitsandbytes_weight_repacked_by_an_eval_forward_is_read_as_it_was():
    """On AVX512-BF16 CPUs a ``Linear4bit`` repacks its weight at its first eval-mode no-grad
    forward, and PEFT's own DoRA misreads the repacked weight from then on (its outputs move by
    ~10%). ``accelerate_peft`` undoes the repacking: the outputs are those from before it."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(256, 128, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(nn.Linear(256, 128).state_dict())
    base = base.to("cpu")
    if not base.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = dora_model(One(base), ["layer"], r=4)
    x = torch.randn(3, 5, 256)
    before = model.train()(x).detach()
    with torch.no_grad():
        model.eval()(x)
    assert base.weight.quant_state.packing_format_for_cpu
    torchdora.accelerate_peft(model)
    assert not base.weight.quant_state.packing_format_for_cpu
    with torch.no_grad():
        assert rel_err(model(x), before) <= 1e-2  # the block scales went through bfloat16


def test_a_kernel_that_quantizes_its_input_is_not_used_for_the_dropped_base_output():
    """bitsandbytes' int8 kernel quantizes its input too except when training on CPU (as on a
    GPU); PEFT takes ``Ŵ x_d`` from the dequantized weight, and so must the accelerated path."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = dora_model(One(quantize_linear(nn.Linear(256, 128), "bnb-int8")), ["layer"], r=4,
                       lora_dropout=0.3)  # fmt: skip
    plain, accelerated = twins(model)
    for run_model in (plain, accelerated):
        run_model.train()
        run_model.base_model.model.layer.base_layer.eval()  # the int8 kernel's own path
    x = torch.randn(3, 5, 256)
    assert_close(run(accelerated, "linear", x), run(plain, "linear", x), FLOAT32)


def test_under_autocast_the_low_rank_branch_runs_in_the_autocast_dtype():
    """As autocast runs PEFT's ``lora_A(x)`` in bfloat16, so the accelerated branch: the same
    output as with its input cast beforehand (a float32 branch would be slower, not PEFT's)."""
    model = layer_model("linear")
    torchdora.accelerate_peft(model)
    x = torch.randn(4, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), model(x.bfloat16()))
