"""Merging an adapter into its base weight and taking it out again (never the training path)."""

from __future__ import annotations

import torch
from torch import Tensor

from torchdora.functional.norm import norm_dtype


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """``s·B A`` as a dense d_out × d_in matrix."""
    return scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


def merge_weight(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    scaling: float,
    eps: float,
    *,
    normalize: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Merged weight ``(m/n)·(W + sBA)`` in the weight's dtype, and the norm ``n`` used.

    ``weight`` is d_out × fan_in. With ``magnitude=None`` this is plain LoRA: ``W + sBA``; with
    ``normalize=False`` ``n`` is the row norm of ``W`` itself (the "no norm" variant). The norm
    is returned so :func:`unmerge_weight` can invert the merge exactly.
    """
    dtype = norm_dtype(weight.dtype)
    direction = weight.to(dtype) + delta_weight(lora_A, lora_B, scaling, dtype)
    if magnitude is None:
        return direction.to(weight.dtype), None
    rows = direction if normalize else weight.to(dtype)
    norm = torch.linalg.vector_norm(rows, dim=1).clamp_min(eps)
    merged = direction * (magnitude.to(dtype) / norm).unsqueeze(1)
    return merged.to(weight.dtype), norm


def unmerge_weight(
    merged: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    scaling: float,
    norm: Tensor | None,
) -> Tensor:
    """Invert :func:`merge_weight`: ``W = W'·(n/m) − sBA`` (``W' − sBA`` for LoRA)."""
    dtype = norm_dtype(merged.dtype)
    direction = merged.to(dtype)
    if magnitude is not None:
        if bool((magnitude == 0).any()):
            raise ValueError(
                "cannot unmerge: some magnitude entries are exactly 0, so the merged rows "
                "no longer carry the original weight; reload the base weights instead"
            )
        direction = direction * (norm.to(dtype) / magnitude.to(dtype)).unsqueeze(1)
    return (direction - delta_weight(lora_A, lora_B, scaling, dtype)).to(merged.dtype)
