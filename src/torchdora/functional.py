"""Pure DoRA maths: the factored row norm, the fused linear forward, and merge/unmerge.

DoRA adapts a frozen weight ``W`` (d_out × d_in) with a low-rank pair ``A`` (r × d_in),
``B`` (d_out × r) and a magnitude ``m`` (d_out)::

    V = W + s·B·A,    n_i = ‖V_i‖₂,    W' = diag(m / n) · V

Nothing on the training path here builds a d_out × d_in matrix. The row norms factor
through small matrices (DESIGN.md §1.1)::

    n_i² = c_i + 2s·Σ_r B_ir P_ir + s²·Σ_r (B G)_ir B_ir,   c = ‖W_i‖², P = W Aᵀ, G = A Aᵀ

and ``P`` comes out of the same frozen matmul that produces ``W x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def norm_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype norms are computed in: at least float32, float64 if any input is float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def weight_sq_row_norm(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``c_i = ‖W_i‖²`` for a weight already laid out as d_out × fan_in, in ``norm_dtype``."""
    dtype = dtype or norm_dtype(weight.dtype)
    return torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()


def factored_row_norm(
    weight_sq_norm: Tensor,
    weight_a: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    eps: float,
) -> Tensor:
    """Row norms ``n_i = ‖W_i + s·(B A)_i‖`` without forming ``B A``.

    Args:
        weight_sq_norm: ``c = ‖W_i‖²``, shape ``(d_out,)``.
        weight_a: ``P = W Aᵀ``, shape ``(d_out, r)``.
        lora_A: ``(r, d_in)``.
        lora_B: ``(d_out, r)``.
        scaling: ``s``.
        eps: lower bound of the result.

    Returns:
        ``n`` of shape ``(d_out,)`` in ``weight_sq_norm``'s dtype (at least float32).
        ``n² `` is clamped at 0 against cancellation, and the floor is applied as
        ``sqrt(max(n², eps²))`` so the gradient stays finite (zero) on floored rows.
    """
    dtype = weight_sq_norm.dtype
    B = lora_B.to(dtype)
    A = lora_A.to(dtype)
    gram = A @ A.T
    cross = (B * weight_a.to(dtype)).sum(dim=1)
    quad = ((B @ gram) * B).sum(dim=1)
    sq = weight_sq_norm + (2.0 * scaling) * cross + (scaling * scaling) * quad
    return sq.clamp_min(eps * eps).sqrt()


def base_and_weight_a(
    x2d: Tensor, weight: Tensor, lora_A: Tensor, stack: bool
) -> tuple[Tensor, Tensor]:
    """``(x Wᵀ, W Aᵀ)`` from the frozen weight.

    With ``stack=True`` one matmul runs over ``[x; A]`` so ``W`` is read once and the
    backward for ``x`` and ``A`` is one matmul too; worth it when ``x`` needs a gradient.
    """
    A = lora_A.to(x2d.dtype)
    if stack:
        out = F.linear(torch.cat([x2d, A]), weight)
        tokens = x2d.shape[0]
        return out[:tokens], out[tokens:].T
    return F.linear(x2d, weight), F.linear(A, weight).T


def add_lora(
    base: Tensor, lora_input: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> Tensor:
    """``base + s·(x Aᵀ) Bᵀ`` for 2-D ``lora_input``, fused into one ``addmm``."""
    dtype = lora_input.dtype
    low_rank = F.linear(lora_input, lora_A.to(dtype))
    return torch.addmm(base, low_rank, lora_B.to(dtype).T, alpha=scaling)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    weight_sq_norm: Tensor,
    *,
    lora_input: Tensor | None = None,
    eps: float = 1e-8,
    detach_norm: bool = False,
    stack: bool = True,
) -> Tensor:
    """DoRA forward for a linear base: ``y = (m/n) ⊙ (W x + s·B(A·x_lora)) + b``.

    Args:
        x: ``(..., d_in)``.
        weight: frozen ``W``, ``(d_out, d_in)``.
        bias: ``(d_out,)`` or ``None``.
        lora_A, lora_B, magnitude: adapter parameters.
        scaling: ``s = alpha / r`` (or ``alpha / sqrt(r)``).
        weight_sq_norm: cached ``‖W_i‖²`` (see :func:`weight_sq_row_norm`).
        lora_input: input of the low-rank branch (e.g. dropout of ``x``); defaults to ``x``.
        eps: floor of the row norm.
        detach_norm: treat ``n`` as a constant in backward (paper §4.3 / PEFT).
        stack: share the frozen matmul between ``x`` and ``A`` (see :func:`base_and_weight_a`).

    Returns:
        ``(..., d_out)`` in ``x``'s dtype.
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    base, weight_a = base_and_weight_a(x2d, weight, lora_A, stack)
    norm = factored_row_norm(weight_sq_norm, weight_a, lora_A, lora_B, scaling, eps)
    if detach_norm:
        norm = norm.detach()
    scale = (magnitude.to(norm.dtype) / norm).to(x.dtype)
    lora_x = x2d if lora_input is None else lora_input.reshape(-1, d_in)
    direction = add_lora(base, lora_x, lora_A, lora_B, scaling)
    return _rescale(direction, scale, bias).reshape(*lead, -1)


def dora_linear_scaled(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    scaling: float,
) -> Tensor:
    """DoRA forward with a precomputed ``scale = m / n`` (inference: the norm is cached)."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    direction = add_lora(F.linear(x2d, weight), x2d, lora_A, lora_B, scaling)
    return _rescale(direction, scale, bias).reshape(*lead, -1)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    lora_input: Tensor | None = None,
) -> Tensor:
    """Plain LoRA forward ``y = W x + b + s·B(A·x_lora)``: the baseline DoRA is measured against."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    lora_x = x2d if lora_input is None else lora_input.reshape(-1, d_in)
    return add_lora(F.linear(x2d, weight, bias), lora_x, lora_A, lora_B, scaling).reshape(*lead, -1)


def _rescale(direction: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    scale = scale.to(direction.dtype)
    if bias is None:
        return direction * scale
    return torch.addcmul(bias.to(direction.dtype), direction, scale)


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """``s·B A`` as a dense d_out × d_in matrix (merging only, never the training path)."""
    return scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


def merge_weight(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    scaling: float,
    eps: float,
) -> tuple[Tensor, Tensor | None]:
    """Merged weight ``(m/n)·(W + sBA)`` in the weight's dtype, and the norm ``n`` used.

    ``weight`` is d_out × fan_in. With ``magnitude=None`` this is plain LoRA: ``W + sBA``.
    The norm is returned so :func:`unmerge_weight` can invert the merge exactly.
    """
    dtype = norm_dtype(weight.dtype)
    direction = weight.to(dtype) + delta_weight(lora_A, lora_B, scaling, dtype)
    if magnitude is None:
        return direction.to(weight.dtype), None
    norm = torch.linalg.vector_norm(direction, dim=1).clamp_min(eps)
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
