"""PEFT DoRA models for the accelerate_peft tests: one layer of each kind, or a tiny
transformers model, with adapters moved off their identity init; and the same model twice,
plain PEFT and accelerated, on equal copies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import model_zoo
import torchdora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class One(nn.Module):
    """A model of one layer called ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _conv1d_gpt2() -> nn.Module:
    return transformers.pytorch_utils.Conv1D(10, 12)  # 12 → 10, weight stored (12, 10)


#: kind: (base layer factory, input factory)
KINDS = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(3, 5, 12)),
    "gpt2-conv1d": (_conv1d_gpt2, lambda: torch.randn(3, 5, 12)),
    "embedding": (lambda: nn.Embedding(20, 8), lambda: torch.randint(0, 20, (3, 5))),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), lambda: torch.randn(2, 2, 4, 4, 4)),
}

#: model_zoo model: its LoRA targets (every kind the model has)
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
}


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every LoRA factor and magnitude of ``model`` off its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if "magnitude" in name:
                param.mul_(1 + 0.1 * noise)
            else:
                param.copy_(noise * 0.3 / param.shape[-1] ** 0.5)


def dora_model(base: nn.Module, targets: list[str], **config) -> nn.Module:
    """``base`` wrapped by PEFT with DoRA adapters on ``targets``, adapters perturbed."""
    model = peft.get_peft_model(
        base, peft.LoraConfig(target_modules=targets, use_dora=True, **config)
    )
    perturb(model)
    return model


def layer_model(kind: str, *, dropout: float = 0.0, rank: int = 4, **config) -> nn.Module:
    """A PEFT DoRA model of one ``kind`` layer, adapters perturbed."""
    torch.manual_seed(0)
    return dora_model(
        One(KINDS[kind][0]()),
        ["layer"],
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=dropout,
        fan_in_fan_out=kind == "gpt2-conv1d",
        **config,
    )


def hf_model(name: str, *, dropout: float = 0.0, **config) -> nn.Module:
    """A PEFT DoRA model of a tiny random ``name`` (see :data:`TARGETS`), adapters perturbed."""
    return dora_model(
        model_zoo.build(name).train(),
        TARGETS[name],
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        fan_in_fan_out=name == "gpt2",
        **config,
    )


def twins(model: nn.Module, **options) -> tuple[nn.Module, nn.Module]:
    """``(model, an accelerated deep copy of it)``."""
    accelerated = copy.deepcopy(model)
    torchdora.accelerate_peft(accelerated, **options)
    return model, accelerated


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of every LoRA parameter (``lora_A``, ``lora_B``, magnitudes) by name."""
    return {
        name: param.grad
        for name, param in model.named_parameters()
        if "lora_" in name and param.requires_grad
    }


def lm_loss(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """A scalar loss of ``model`` (a :data:`TARGETS` model) on token ``ids``."""
    if name == "bert":
        return model(input_ids=ids, labels=ids[:, 0] % 3).loss
    return model(input_ids=ids, labels=ids).loss
