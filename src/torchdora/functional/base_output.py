"""DoRA on a linear base whose output someone else computed: PEFT's layers run ``W x + b``
themselves and hand it to their DoRA variant, which adds the rest.

From ``result = W x + b`` and the row norms ``n`` this computes PEFT's DoRA output without a
second pass over ``W x``::

    y = (m/n) ⊙ (result − b + s·B A x) + b                        (no dropout, or eval)
    y = result + (m/n − 1) ⊙ W x_d + (m/n)·s·B A x_d              (x_d = dropout(x))

The second line is PEFT's form with dropout on the low-rank branch (its base output is taken
once more, on the dropped input); the caller passes ``W x_d`` as ``base_dropped``. Both are
``y = β + α ⊙ D + s·x_l Aᵀ (diag(m/n) B)ᵀ`` with ``(D, α, β) = (result, m/n, (1 − m/n)·b)``
or ``(W x_d, m/n − 1, result)``. The caller computes the norm (it knows how to read ``W``:
a plain, transposed or quantized weight); the rest, eagerly, is
:class:`RescaleBaseOutputFunction`, which keeps one ``T × d_out`` tensor (``D``) more than LoRA
where autograd would keep two at the backward's peak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchdora.functional.autocast import autocast_enabled, autocast_off, cast
from torchdora.functional.norm import scale_dtype


def dora_from_base_output(
    result: Tensor,
    lora_x: Tensor,
    base_dropped: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    norm: Tensor,
) -> Tensor:
    """PEFT's DoRA output from its base output ``result`` (see the module docstring).

    Args:
        result: ``W x + b``, ``(..., d_out)``.
        lora_x: the low-rank branch's input (``x``, or ``dropout(x)``), ``(..., d_in)``.
        base_dropped: ``W x_d`` without bias when ``lora_x`` is a dropped ``x``, else ``None``.
        bias: ``b`` or ``None``.
        lora_A, lora_B, magnitude: ``(r, d_in)``, ``(d_out, r)``, ``(d_out,)``.
        scaling: ``s``.
        norm: ``n = ‖W + s·B A‖`` per row (e.g. :func:`factored_row_norm`), detached or not:
            its gradient is the caller's choice.

    Returns:
        ``(..., d_out)`` in ``result``'s dtype.
    """
    scale = cast(magnitude.reshape(-1), norm.dtype) / norm
    lead, d_out = result.shape[:-1], result.shape[-1]
    flat = [t if t is None else t.reshape(-1, t.shape[-1]) for t in (result, lora_x, base_dropped)]
    if torch.compiler.is_compiling():
        out = rescale_base_output(*flat, bias, lora_A, lora_B, scale, scaling)[0]
    else:
        autocast = autocast_enabled(result)
        with autocast_off(result) as dtype:
            if autocast:  # as autocast would cast the low-rank branch
                flat = [cast(t, dtype) for t in flat]
            out = RescaleBaseOutputFunction.apply(*flat, bias, lora_A, lora_B, scale, scaling)
    return out.reshape(*lead, d_out)


def rescale_base_output(
    result: Tensor,
    lora_x: Tensor,
    base_dropped: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """``y = β + α ⊙ D + s·x_l Aᵀ (diag(m/n) B)ᵀ`` on 2-D tensors, and ``x_l Aᵀ``.

    ``scale`` is ``m/n``; the sum is formed in ``result``'s dtype (float32 for float16 results,
    rounded once at the end: see :func:`~torchdora.functional.norm.scale_dtype`).
    """
    dtype = result.dtype
    scale = cast(scale, scale_dtype(dtype))
    low_rank = F.linear(lora_x, cast(lora_A, lora_x.dtype))
    if base_dropped is None:
        bias_part = None if bias is None else cast(bias, scale.dtype) * (1 - scale)
        out = result * scale if bias is None else torch.addcmul(bias_part, result, scale)
    else:
        out = torch.addcmul(cast(result, scale.dtype), base_dropped, scale - 1)
    scaled_B = cast(lora_B, scale.dtype) * scale.unsqueeze(1)
    out = out.addmm_(cast(low_rank, out.dtype), cast(scaled_B, out.dtype).t(), alpha=scaling)
    return cast(out, dtype), low_rank


class RescaleBaseOutputFunction(torch.autograd.Function):
    """:func:`rescale_base_output` with its backward written out.

    It saves ``D`` (``result`` itself, or ``W x_d``) rather than the direction: the gradient of
    ``m/n`` needs ``Σ_t g ⊙ (D − b + s·B A x)``, and ``Σ_t g ⊙ s·B A x = s·Σ_r (gᵀ A x) ⊙ B``
    comes out of the ``d_out × r`` product ``B`` needs anyway. The one ``T × d_out`` tensor the
    backward allocates holds ``g ⊙ D`` for that sum, then ``∂L/∂D``. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, result, lora_x, base_dropped, bias, lora_A, lora_B, scale, scaling):
        out, low_rank = rescale_base_output(
            result, lora_x, base_dropped, bias, lora_A, lora_B, scale, scaling
        )
        direction = result if base_dropped is None else base_dropped
        ctx.save_for_backward(direction, lora_x, bias, lora_A, lora_B, scale, low_rank)
        ctx.scaling, ctx.dropped = scaling, base_dropped is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with autocast_off(grad_out):
            return *_backward(ctx, grad_out), None


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of ``result, lora_x, base_dropped, bias, lora_A, lora_B, scale``."""
    direction, lora_x, bias, lora_A, lora_B, scale, low_rank = ctx.saved_tensors
    need_result, need_x, need_dropped, need_bias, need_A, need_B, need_scale, _ = (
        ctx.needs_input_grad
    )
    s, fp = ctx.scaling, scale.dtype
    # The low-rank branch's gradients in its own dtype (float32 adapters on a bfloat16 base,
    # as PEFT computes them): gᵀ (A x) is d_out × r.
    grad_low_rank = cast(grad_out, low_rank.dtype)
    low_t_g = cast(torch.mm(grad_low_rank.t(), low_rank), fp)
    B = cast(lora_B, fp)
    grad_sum = _column_sum(grad_out, fp) if bias is not None else None
    # Σ_t g ⊙ (D − b + s·B A x) per row: D's part through a T × d_out buffer, the rest d_out × r.
    buffer = torch.mul(grad_out, direction)
    grad_scale = None
    if need_scale:
        grad_scale = _column_sum(buffer, fp)
        if not ctx.dropped and bias is not None:
            grad_scale = grad_scale.sub_(cast(bias, fp) * grad_sum)
        grad_scale = grad_scale.add_((low_t_g * B).sum(1), alpha=s)

    # ∂L/∂D = g ⊙ α into the buffer; ∂L/∂result is that (no dropout) or g itself.
    alpha = cast(scale, scale_dtype(grad_out.dtype))
    grad_direction = torch.mul(grad_out, alpha - 1 if ctx.dropped else alpha, out=buffer)
    scale_column = scale.unsqueeze(1)
    grad_low = torch.mm(grad_low_rank, cast(B * scale_column, low_rank.dtype)).mul_(s)
    grad_bias = None  # y holds (1 − m/n) ⊙ b besides the b inside result
    if need_bias and not ctx.dropped:
        grad_bias = cast(grad_sum * (1 - scale), bias.dtype)
    return (
        (grad_out if ctx.dropped else grad_direction) if need_result else None,
        torch.mm(grad_low, cast(lora_A, grad_low.dtype)) if need_x else None,
        grad_direction if ctx.dropped and need_dropped else None,
        grad_bias,
        cast(torch.mm(grad_low.t(), lora_x), lora_A.dtype) if need_A else None,
        cast((low_t_g * scale_column).mul_(s), lora_B.dtype) if need_B else None,
        grad_scale,
    )


def _column_sum(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.sum(0)`` in ``dtype``. Reduced in ``t``'s own dtype, which accumulates in float32
    anyway and rounds once (asking for a float32 result copies all of a bfloat16 ``t`` on CPU),
    except float16, whose range a sum over many rows can exceed."""
    if t.dtype == torch.float16:
        return t.sum(0, dtype=dtype)
    return cast(t.sum(0), dtype)
