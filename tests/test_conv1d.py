"""DoRAConv1D (transformers' Conv1D, weight stored transposed) against a float64 reference
and against PEFT's fan_in_fan_out DoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_kinds import (
    assert_matches_reference,
    assert_merge_round_trip,
    assert_no_grad_forward_matches,
    randomize,
)
from reference import naive_dora_weight, rel_err
from torchdora import DoRAConv1D

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def naive(x, W_stored, b, A, B, m, s, eps, detach_norm):
    """``y = x W'ᵀ + b`` with ``W = W_storedᵀ`` (out × in) adapted explicitly."""
    adapted = naive_dora_weight(W_stored.T, A, B, m, s, eps, detach_norm)
    return x @ adapted.T + b


def random_conv1d(nx=7, nf=5, rank=3, dtype=torch.float64, **options):
    base = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    layer = DoRAConv1D(base, rank=rank, alpha=2.0 * rank, **options)
    randomize(layer)
    return layer, torch.randn(2, 4, nx, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("nx", "nf", "rank"), [(7, 5, 3), (4, 12, 2), (3, 2, 6)])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_forward_and_gradients_match_reference(nx, nf, rank, dtype, detach_norm):
    layer, x = random_conv1d(nx, nf, rank, dtype, detach_norm=detach_norm)
    layer.bias.requires_grad_(True)
    assert_matches_reference(layer, x, naive, dtype, detach_norm)


def test_layout_init_merge_and_unload():
    layer, x = random_conv1d()
    base = layer.base_layer
    assert (layer.in_features, layer.out_features) == (7, 5)
    assert layer.magnitude.shape == (5,) and layer.lora_A.shape == (3, 7)
    assert layer.weight is base.weight  # the stored (in × out) parameter
    assert_no_grad_forward_matches(layer, x, naive)
    assert_merge_round_trip(layer, x)
    expected = layer(x).detach()
    plain = layer.merge_and_unload()
    assert type(plain) is Conv1D and plain.weight.shape == (7, 5)
    assert rel_err(plain(x), expected) <= 1e-12


def test_init_reproduces_base():
    base = Conv1D(6, 4).double()
    layer = DoRAConv1D(base, rank=2)
    assert torch.allclose(layer.magnitude, base.weight.norm(dim=0))  # per output feature
    x = torch.randn(3, 4, dtype=torch.float64)
    assert rel_err(layer(x), base(x)) <= 1e-14


def test_bad_base():
    with pytest.raises(TypeError, match="Conv1D"):
        DoRAConv1D(nn.Linear(3, 3))


def test_matches_peft_fan_in_fan_out_dora():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(9, 6)

        def forward(self, x):
            return self.c_attn(x)

    base = Tiny()
    ours = DoRAConv1D(Conv1D(9, 6), rank=4, alpha=8.0, detach_norm=True)
    ours.base_layer.load_state_dict(base.c_attn.state_dict())
    randomize(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True
    )
    theirs = peft.get_peft_model(base, config)
    layer = theirs.base_model.model.c_attn
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    x = torch.randn(2, 3, 6)
    out_ours, out_theirs = ours(x), theirs(x)
    assert rel_err(out_ours, out_theirs) <= 1e-5
    grad_out = torch.randn_like(out_ours)
    out_ours.backward(grad_out)
    out_theirs.backward(grad_out)
    pairs = {
        "A": (ours.lora_A.grad, layer.lora_A["default"].weight.grad),
        "B": (ours.lora_B.grad, layer.lora_B["default"].weight.grad),
        "m": (ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad),
    }
    for name, (a, b) in pairs.items():
        assert rel_err(a, b) <= 1e-5, name
