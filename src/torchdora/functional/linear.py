"""DoRA and LoRA on a linear base: the forward as maths, the fast paths beside it.

``y = (m/n) ⊙ (W x + s·B(A·x_lora)) + b`` with ``n = ‖W + s·B A‖`` per row.
:func:`dora_linear_autograd` is that formula in plain autograd ops, one screen long, and what
``torch.compile`` traces; eagerly :func:`dora_linear` runs
:class:`~torchdora.functional.fused.DoRALinearFunction`, the same numbers with the backward
written out. :func:`dora_linear_scaled` is the no-grad form with ``m/n`` cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdora.functional.autocast import autocast_off, cast
from torchdora.functional.fused import DoRALinearFunction, LoRALinearFunction
from torchdora.functional.heuristics import stack_base_matmul
from torchdora.functional.norm import factored_row_norm, rescale, scale_dtype


def base_and_weight_a(
    x2d: Tensor, weight: Tensor, lora_A: Tensor, stack: bool
) -> tuple[Tensor, Tensor]:
    """``(x Wᵀ, W Aᵀ)`` from the frozen weight, as one matmul over ``[x; A]`` or as two."""
    A = lora_A.to(x2d.dtype)
    if stack:
        base, weight_a_t = F.linear(torch.cat([x2d, A]), weight).split([x2d.shape[0], len(A)])
        return base, weight_a_t.T
    return F.linear(x2d, weight), F.linear(A, weight).T


def add_lora(
    base: Tensor, lora_input: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> Tensor:
    """``base + s·(x Aᵀ) Bᵀ`` for 2-D ``lora_input``, fused into one ``addmm``."""
    dtype = lora_input.dtype
    low_rank = F.linear(lora_input, lora_A.to(dtype))
    return torch.addmm(base, low_rank, lora_B.to(dtype).T, alpha=scaling)


def add_lora_(
    out: Tensor, lora_input: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> Tensor:
    """``out += s·(x Aᵀ) Bᵀ`` in place: one fresh ``T × d_out`` tensor fewer than :func:`add_lora`.

    On CPU a fresh tensor of that size costs about as much as two passes over it (the pages
    are faulted in anew each step), which is measurable next to a ``T × d_out`` matmul.
    """
    low_rank = F.linear(lora_input, lora_A.to(lora_input.dtype)).to(out.dtype)
    return out.addmm_(low_rank, lora_B.to(out.dtype).T, alpha=scaling)


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
    stack: bool | None = None,
) -> Tensor:
    """DoRA forward for a linear base: ``y = (m/n) ⊙ (W x + s·B(A·x_lora)) + b``.

    In eager mode the backward is written out (:class:`DoRALinearFunction`); under
    ``torch.compile`` the same maths runs as plain autograd ops for the compiler to trace.

    Args:
        x: ``(..., d_in)``.
        weight: ``W``, ``(d_out, d_in)``; frozen as a rule, but a trainable one gets its gradient.
        bias: ``(d_out,)`` or ``None``.
        lora_A, lora_B, magnitude: adapter parameters.
        scaling: ``s = alpha / r`` (or ``alpha / sqrt(r)``).
        weight_sq_norm: cached ``‖W_i‖²`` (see :func:`weight_sq_row_norm`).
        lora_input: input of the low-rank branch (e.g. dropout of ``x``); defaults to ``x``.
        eps: floor of the row norm.
        detach_norm: treat ``n`` as a constant in backward (paper §4.3 / PEFT).
        stack: share the frozen forward matmul between ``x`` and ``A``; ``None`` picks by
            :func:`~torchdora.functional.heuristics.stack_base_matmul`.

    Returns:
        ``(..., d_out)`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``).
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    lora_x = None if lora_input is None else lora_input.reshape(-1, d_in)
    if stack is None:
        stack = stack_base_matmul(x2d.shape[0], weight, lora_A.shape[0])
    adapter = (lora_A, lora_B, magnitude, weight_sq_norm, scaling, eps, detach_norm, stack)
    if torch.compiler.is_compiling():
        out = dora_linear_autograd(x2d, lora_x, weight, bias, *adapter)
    else:
        with autocast_off(x) as dtype:
            x2d, lora_x, weight, bias = (cast(t, dtype) for t in (x2d, lora_x, weight, bias))
            out = DoRALinearFunction.apply(x2d, lora_x, weight, bias, *adapter)
    return out.reshape(*lead, weight.shape[0])  # -1 is ambiguous with 0 tokens


def dora_linear_autograd(
    x2d, lora_x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, eps,
    detach_norm, stack,
) -> Tensor:  # fmt: skip
    """:func:`dora_linear` on 2-D inputs in plain autograd ops: the maths, as ``torch.compile``
    traces it."""
    base, weight_a = base_and_weight_a(x2d, weight, lora_A, stack)
    norm = factored_row_norm(weight_sq_norm, weight_a, lora_A, lora_B, scaling, eps)
    if detach_norm:
        norm = norm.detach()
    scale = (magnitude.to(norm.dtype) / norm).to(scale_dtype(x2d.dtype))
    direction = add_lora(base, x2d if lora_x is None else lora_x, lora_A, lora_B, scaling)
    return rescale(direction, scale, bias)


def dora_linear_scaled(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    scaling: float,
) -> Tensor:
    """DoRA forward with a precomputed ``scale = m / n`` (inference: the norm is cached).

    For no-grad use: the low-rank update and the rescale are applied in place to the frozen
    matmul's output, so the only extra cost over LoRA is one pass over ``T × d_out``.
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    out = add_lora_(F.linear(x2d, weight), x2d, lora_A, lora_B, scaling)
    scale = scale.to(scale_dtype(out.dtype))
    if bias is None:
        out = out.mul_(scale)
    else:
        out = torch.addcmul(bias.to(out.dtype), out, scale, out=out)
    return out.reshape(*lead, weight.shape[0])  # -1 is ambiguous with 0 tokens


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
    """Plain LoRA forward ``y = W x + b + s·B(A·x_lora)``: the baseline DoRA is measured against.

    Eager mode uses :class:`LoRALinearFunction` (as for DoRA, ``torch.compile`` traces plain ops).
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, d_in)
    lora_x = None if lora_input is None else lora_input.reshape(-1, d_in)
    if torch.compiler.is_compiling():
        out = add_lora(
            F.linear(x2d, weight, bias), x2d if lora_x is None else lora_x, lora_A, lora_B, scaling
        )
    else:
        with autocast_off(x) as dtype:
            x2d, lora_x, weight, bias = (cast(t, dtype) for t in (x2d, lora_x, weight, bias))
            out = LoRALinearFunction.apply(x2d, lora_x, weight, bias, lora_A, lora_B, scaling)
    return out.reshape(*lead, weight.shape[0])  # -1 is ambiguous with 0 tokens
