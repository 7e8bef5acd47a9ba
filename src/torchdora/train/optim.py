"""Optimizer parameter groups for DoRA/LoRA fine-tuning, and the AdamW that uses them.

Each trainable parameter falls in one group, by a component of its dotted name (so
torchdora's ``q.lora_A`` and PEFT's ``q.lora_A.default.weight`` are alike):

- ``lora_A`` (also PEFT's ``lora_embedding_A``): lr ``lr``, decay ``weight_decay``;
- ``lora_B`` (``lora_embedding_B``): lr ``lr · loraplus_lr_ratio`` (LoRA+), decay
  ``weight_decay``;
- ``magnitude`` (PEFT's ``lora_magnitude_vector``): lr ``magnitude_lr``, by default
  ``lr · magnitude_lr_ratio`` (3×), decay ``magnitude_weight_decay`` (default 0);
- ``other``: every other trainable matrix (heads in ``modules_to_save``, unfrozen bases):
  lr ``lr``, decay ``weight_decay``;
- ``other_no_decay``: every other trainable vector (biases, LayerNorm): lr ``lr``, no decay.

Why no weight decay on the magnitude by default: AdamW's decay pulls a parameter towards
zero, and ``m`` starts at the pretrained row norms ``‖W_i‖``, so decay would shrink every
output row of the adapted weight rather than regularise the update. Decay on ``A``/``B``
pulls towards the unchanged model (``B A = 0``), which is what regularising an adapter means.
Vectors outside the adapter (biases, LayerNorm) are not decayed, as is usual for transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

GROUP_NAMES = ("lora_A", "lora_B", "magnitude", "other", "other_no_decay")
RECOMMENDED_MAGNITUDE_LR_RATIO = 3.0

_KINDS = {
    "lora_A": "lora_A",
    "lora_embedding_A": "lora_A",
    "lora_B": "lora_B",
    "lora_embedding_B": "lora_B",
    "magnitude": "magnitude",
    "lora_magnitude_vector": "magnitude",
}


def parameter_group_name(param_name: str) -> str:
    """``"lora_A"``, ``"lora_B"``, ``"magnitude"`` or ``"other"`` for a parameter's full name.

    Matches any dotted component, so torchdora's ``q.lora_A`` and PEFT's
    ``q.lora_A.default.weight`` are both ``lora_A``.
    """
    return next(
        (_KINDS[part] for part in reversed(param_name.split(".")) if part in _KINDS), "other"
    )


def get_parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    magnitude_lr: float | None = None,
    magnitude_lr_ratio: float = RECOMMENDED_MAGNITUDE_LR_RATIO,
    loraplus_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    magnitude_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer parameter groups.

    Args:
        model: a model with DoRA/LoRA layers (torchdora's or PEFT's); frozen parameters are
            left out.
        lr: learning rate of ``lora_A`` and of the ``other`` group.
        magnitude_lr: learning rate of the magnitudes; ``None`` means
            ``lr * magnitude_lr_ratio``.
        magnitude_lr_ratio: magnitude lr relative to ``lr`` when ``magnitude_lr`` is not
            given. The default 3 is a commonly recommended start for DoRA.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): ``lora_B``'s lr is this times ``lr``.
            1 turns LoRA+ off; its paper suggests 2–16.
        weight_decay: decoupled weight decay of ``lora_A``, ``lora_B`` and of the matrices in
            ``other``.
        magnitude_weight_decay: weight decay of the magnitudes (default 0, see the module doc).

    Returns:
        One dict per non-empty group, in the order of :data:`GROUP_NAMES`, each with
        ``params``, ``lr``, ``weight_decay`` and ``name``; PyTorch optimizers keep the extra
        ``name`` key, which logs and checkpoints use.
    """
    for label, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio)):
        if not value > 0:
            raise ValueError(f"{label} must be > 0, got {value}")
    if magnitude_lr is None:
        if not magnitude_lr_ratio > 0:
            raise ValueError(f"magnitude_lr_ratio must be > 0, got {magnitude_lr_ratio}")
        magnitude_lr = lr * magnitude_lr_ratio
    elif not magnitude_lr > 0:
        raise ValueError(f"magnitude_lr must be > 0, got {magnitude_lr}")
    settings = dict(
        zip(
            GROUP_NAMES,
            [
                (lr, weight_decay),
                (lr * loraplus_lr_ratio, weight_decay),
                (magnitude_lr, magnitude_weight_decay),
                (lr, weight_decay),
                (lr, 0.0),
            ],
            strict=True,
        )
    )
    params: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = parameter_group_name(name)
        if group == "other" and param.dim() < 2:
            group = "other_no_decay"
        params[group].append(param)
    return [
        {"params": params[name], "lr": lr_, "weight_decay": wd, "name": name}
        for name, (lr_, wd) in settings.items()
        if params[name]
    ]


def create_optimizer(
    model: nn.Module,
    lr: float,
    *,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    magnitude_lr: float | None = None,
    magnitude_lr_ratio: float = RECOMMENDED_MAGNITUDE_LR_RATIO,
    loraplus_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    magnitude_weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` (AdamW by default) over :func:`get_parameter_groups`.

    ``optimizer_kwargs`` go to the optimizer (``betas``, ``eps``, ``fused``, …).
    """
    groups = get_parameter_groups(
        model,
        lr,
        magnitude_lr=magnitude_lr,
        magnitude_lr_ratio=magnitude_lr_ratio,
        loraplus_lr_ratio=loraplus_lr_ratio,
        weight_decay=weight_decay,
        magnitude_weight_decay=magnitude_weight_decay,
    )
    if not groups:
        raise ValueError(
            "the model has no trainable parameters: add DoRA/LoRA layers "
            "(torchdora.apply_dora) or unfreeze a module before training"
        )
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
