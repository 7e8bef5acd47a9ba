"""Same W, A, B, m in PEFT's DoRA and ours: equal outputs, and PEFT's gradients equal ours
with ``detach_norm=True``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference import rel_err
from torchdora import DoRALinear

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize(("d_in", "d_out", "rank", "alpha"), [(24, 16, 4, 8.0), (9, 30, 8, 16.0)])
def test_peft_dora_forward_and_gradients(d_in, d_out, rank, alpha):
    torch.manual_seed(0)
    base = Tiny(d_in, d_out)
    ours = DoRALinear.from_linear(nn.Linear(d_in, d_out), rank=rank, alpha=alpha, detach_norm=True)
    ours.base_layer.load_state_dict(base.proj.state_dict())
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_(std=0.2)
        ours.magnitude.uniform_(0.5, 2.0)

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], use_dora=True)
    theirs = peft.get_peft_model(base, config)
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)

    x = torch.randn(3, 5, d_in)
    grad_out = torch.randn(3, 5, d_out)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    assert rel_err(out_ours, out_theirs) <= 1e-5
    out_ours.backward(grad_out)
    out_theirs.backward(grad_out)
    pairs = {
        "x": (x_ours.grad, x_theirs.grad),
        "A": (ours.lora_A.grad, layer.lora_A["default"].weight.grad),
        "B": (ours.lora_B.grad, layer.lora_B["default"].weight.grad),
        "m": (ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad),
    }
    for name, (a, b) in pairs.items():
        assert rel_err(a, b) <= 1e-5, name
