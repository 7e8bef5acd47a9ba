"""DoRA without normalisation (``normalize=False``): ``W' = m ⊙ (W + s·BA) / ‖W‖``, ``‖W‖`` the
frozen base's row norms, a constant.

Every kind is checked in forward and in every gradient against a float64 autograd
implementation of that formula on the dense matrix (nothing of torchdora's maths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layer_kinds import TOL, assert_merge_round_trip, ours, randomize, reference
from model_zoo import build, example_inputs, output
from reference import rel_err
from torchdora import (
    DoRAConfig,
    DoRAConv,
    DoRAConv1D,
    DoRAEmbedding,
    DoRALinear,
    QuantizedDoRALinear,
    apply_dora,
    dora_modules,
    initialize_magnitude,
)
from torchdora.io import inspect_adapter, load_adapter, save_adapter
from torchdora.io.peft_format import peft_state_dict


def no_norm_weight(rows, A, B, m, s):
    """``m / ‖W‖ ⊙ (W + s·B A)`` row-wise, ``‖W‖`` taken as a constant."""
    return (m / rows.detach().norm(dim=1)).unsqueeze(1) * (rows + s * (B @ A))


def naive_linear(x, W, b, A, B, m, s, eps, detach_norm):
    return F.linear(x, no_norm_weight(W, A, B, m, s), b)


def naive_conv1d(x, W, b, A, B, m, s, eps, detach_norm):  # Conv1D stores Wᵀ
    return F.linear(x, no_norm_weight(W.T, A, B, m, s), b)


def naive_conv2d(x, W, b, A, B, m, s, eps, detach_norm):
    adapted = no_norm_weight(W.reshape(W.shape[0], -1), A, B, m, s).reshape(W.shape)
    return F.conv2d(x, adapted, b, padding=1)


def naive_embedding(x, W, b, A, B, m, s, eps, detach_norm):
    return F.embedding(x, no_norm_weight(W.T, A, B, m, s).T)


def conv1d_layer(dtype):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(7, 6).to(dtype)
    return DoRAConv1D(conv1d, rank=4, normalize=False), torch.randn(3, 2, 6, dtype=dtype)


KINDS = {
    "linear": (
        lambda dt: (DoRALinear(6, 7, 4, dtype=dt, normalize=False), torch.randn(3, 5, 6, dtype=dt)),
        naive_linear,
    ),
    "conv2d": (
        lambda dt: (DoRAConv(nn.Conv2d(3, 4, 3, padding=1).to(dt), rank=4, normalize=False),
                    torch.randn(2, 3, 5, 5, dtype=dt)),
        naive_conv2d,
    ),
    "embedding": (
        lambda dt: (DoRAEmbedding(nn.Embedding(11, 6).to(dt), rank=4, normalize=False),
                    torch.randint(0, 11, (3, 4))),
        naive_embedding,
    ),
    "conv1d": (conv1d_layer, naive_conv1d),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_every_gradient_match_the_naive_formula(kind, dtype):
    make, naive = KINDS[kind]
    torch.manual_seed(0)
    layer, x = make(dtype)
    with torch.no_grad():
        start = layer(x)
        assert rel_err(start, layer.base_layer(x)) <= TOL[dtype]  # m = ‖W‖, B = 0: the base
    randomize(layer)
    grad_out = torch.randn(start.shape, dtype=torch.float64)
    ref_out, ref = reference(layer, x, naive, grad_out)
    out, got = ours(layer, x, grad_out)
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert set(got) == set(ref)
    scale = max(float(g.norm()) for g in ref.values())
    for name in got:
        assert rel_err(got[name], ref[name], floor=scale) <= TOL[dtype], name
    with torch.no_grad():  # the cached no-grad path, twice
        assert rel_err(layer.eval()(x), ref_out) <= TOL[dtype]
        assert rel_err(layer(x), ref_out) <= TOL[dtype]
    if kind != "embedding":
        assert_merge_round_trip(layer, x, tol=1e-12 if dtype == torch.float64 else 1e-5)


def test_quantized_base_matches_its_dequantized_weight():
    pytest.importorskip("bitsandbytes")
    from torchdora.quantization import quantize_linear

    torch.manual_seed(0)
    layer = QuantizedDoRALinear(
        quantize_linear(nn.Linear(16, 8), "bnb-nf4"), rank=4, normalize=False
    )
    randomize(layer)
    x = torch.randn(5, 16, requires_grad=True)
    W = layer.weight_matrix().double()
    A, B, m = (
        t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude)
    )
    xd = x.detach().double().requires_grad_()
    expected = F.linear(xd, no_norm_weight(W, A, B, m, layer.scaling), layer.bias.double())
    out = layer(x)
    assert rel_err(out, expected) <= 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for ours_t, ref_t in ((x, xd), (layer.lora_A, A), (layer.lora_B, B), (layer.magnitude, m)):
        assert rel_err(ours_t.grad, ref_t.grad) <= 1e-5


def test_no_norm_needs_dora():
    with pytest.raises(ValueError, match="needs use_dora=True"):
        DoRAConfig(normalize=False, use_dora=False)
    with pytest.raises(ValueError, match="needs use_dora=True"):
        DoRALinear(4, 4, normalize=False, use_dora=False)


def no_norm_model():
    model = apply_dora(
        build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"], normalize=False)
    )
    torch.manual_seed(2)
    for _, layer in dora_modules(model):
        randomize(layer, b_std=0.1)
    return model.eval()


def test_files_round_trip_in_torchdora_and_peft_refuses_them(tmp_path):
    peft = pytest.importorskip("peft")
    model = no_norm_model()
    save_adapter(model, tmp_path)
    loaded = load_adapter(build("llama"), tmp_path).eval()
    assert all(not layer.normalize for _, layer in dora_modules(loaded))
    before, after = peft_state_dict(model), peft_state_dict(loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(loaded, inputs), output(model, inputs))
    assert "without normalisation" in str(inspect_adapter(tmp_path))
    # PEFT cannot compute this variant; it must not load it as ordinary DoRA.
    with pytest.raises(Exception, match="TORCHDORA_DORA_NO_NORM"):
        peft.PeftModel.from_pretrained(build("llama"), tmp_path)


def test_meta_init_sets_the_base_norms():
    model = no_norm_model()
    reference_norms = {n: layer.weight.norm(dim=1) for n, layer in dora_modules(model)}
    initialize_magnitude(model)  # A, B kept: m = ‖W‖ makes it compute what LoRA does
    for name, layer in dora_modules(model):
        assert rel_err(layer.magnitude, reference_norms[name]) <= 1e-6
