"""DoRA's and LoRA's linear forward with the backward written out: the eager fast path.

:func:`torchdora.functional.dora_linear` states the maths in plain autograd ops (what
``torch.compile`` traces); the Functions here compute the same numbers with fewer passes over
``T × d_out`` memory and one activation fewer than autograd would keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchdora.functional.autocast import autocast_off, cast
from torchdora.functional.norm import norm_backward, norm_forward, rescale, scale_dtype


def _direction_buffer(
    x2d: Tensor, lora_x: Tensor | None, weight: Tensor, A: Tensor, B: Tensor, scaling: float,
    stack: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The direction ``W x + s·B A x_lora`` (in ``buffer``'s first T rows), ``Pᵀ = A Wᵀ``,
    and ``A x_lora``.

    Stacked, ``buffer`` is the ``(T + r) × d_out`` result of one matmul over ``[x; A]`` and
    ``Pᵀ`` its last ``r`` rows; otherwise ``buffer`` is the ``T × d_out`` direction alone and
    ``Pᵀ`` a tensor of its own (a ``(T + r)``-row buffer would be an allocation of a size
    nothing else in the step has, which glibc tends to serve with fresh pages every step).
    ``A`` and ``B`` come in ``x2d``'s dtype.
    """
    tokens = x2d.shape[0]
    if stack:
        buffer = F.linear(torch.cat([x2d, A]), weight)
        weight_a_t = buffer[tokens:]
    else:
        buffer = F.linear(x2d, weight)
        weight_a_t = F.linear(A, weight)
    low_rank = F.linear(x2d if lora_x is None else lora_x, A)
    buffer[:tokens].addmm_(low_rank, B.T, alpha=scaling)
    return buffer, weight_a_t, low_rank


class DoRALinearFunction(torch.autograd.Function):
    """:func:`~torchdora.functional.dora_linear` on 2-D inputs, with its backward written out.

    Why not plain autograd: autograd keeps the direction ``W x + s·B A x`` for the gradient of
    ``m/n``, allocates ``g ⊙ direction`` to reduce it, and assembles the stacked matmul's
    gradient in yet another ``(T + r) × d_out`` tensor. Here the backward reduces
    ``Σ_t g ⊙ direction`` in place in the saved buffer, then writes ``g ⊙ m/n`` over the
    direction and ``∂L/∂(W Aᵀ)`` over ``W Aᵀ`` (stacked: one matmul with ``W`` then gives the
    gradients of ``x`` and, through ``W Aᵀ``, of ``A``). The step holds one ``T × d_out``
    tensor more than LoRA, and never a ``d_out × d_in`` one unless ``W`` itself is trained.

    Not twice differentiable. A graph kept with ``retain_graph=True`` can be backpropagated
    again: the second backward recomputes the buffer the first one consumed.
    """

    @staticmethod
    def forward(
        ctx, x2d, lora_x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, eps,
        detach_norm, stack,
    ):  # fmt: skip
        dtype, tokens = x2d.dtype, x2d.shape[0]
        A, B = lora_A.to(dtype), lora_B.to(dtype)
        buffer, weight_a_t, low_rank = _direction_buffer(x2d, lora_x, weight, A, B, scaling, stack)
        scale, norm, floored, q = norm_forward(
            weight_sq_norm, weight_a_t, lora_A, lora_B, magnitude, scaling, eps
        )
        scale = scale.to(scale_dtype(dtype))
        out = rescale(buffer[:tokens], scale, bias)
        saved = (x2d, lora_x, weight, lora_A, lora_B, magnitude, low_rank, floored, norm, q, scale)
        # Stacked, Pᵀ is the buffer's last rows: saving it apart would let a saved-tensor hook
        # (offloading) unpack two copies, and the backward writes ∂L/∂Pᵀ through that view.
        ctx.save_for_backward(*saved, buffer, None if stack else weight_a_t)
        ctx.scaling, ctx.detach_norm, ctx.stack = scaling, detach_norm, stack
        ctx.buffer_consumed = False
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with autocast_off(grad_out):
            return *_dora_linear_backward(ctx, grad_out), None, None, None, None


def _take_buffers(
    ctx, buffer: Tensor, weight_a_t: Tensor | None, x2d, lora_x, weight, A: Tensor, B: Tensor
) -> tuple[Tensor, Tensor]:
    """The saved forward buffer and ``Pᵀ``, for the backward to overwrite.

    Written through ``.data`` so autograd's in-place check does not fire on the saved tensor;
    a graph kept with ``retain_graph=True`` therefore finds it consumed on its next backward,
    which recomputes it instead. (Being in ``saved_tensors`` lets activation checkpointing
    and offloading hooks see the buffer.)
    """
    if ctx.buffer_consumed:
        buffer, weight_a_t, _ = _direction_buffer(x2d, lora_x, weight, A, B, ctx.scaling, ctx.stack)
    ctx.buffer_consumed = True
    buffer = buffer.data
    return buffer, (buffer[len(x2d) :] if ctx.stack else weight_a_t.data)


def _frozen_matmul_grads(
    buffer: Tensor, weight_a_t: Tensor, weight: Tensor, tokens: int, need_x: bool, need_p: bool,
    stack: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """``(∂L/∂direction) W`` and ``(∂L/∂Pᵀ) W`` (``None`` where not needed).

    Stacked, one matmul over the buffer's rows gives both, as the forward's did.
    """
    if not stack:
        grad_x = buffer @ weight if need_x else None
        return grad_x, (weight_a_t @ weight if need_p else None)
    rows = buffer[(0 if need_x else tokens) : (len(buffer) if need_p else tokens)]
    grad_in = rows @ weight if need_x or need_p else None
    grad_x = grad_in[:tokens] if need_x else None
    return grad_x, (grad_in[len(rows) - len(weight_a_t) :] if need_p else None)


def _dora_linear_backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of ``x2d, lora_x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm``."""
    x2d, lora_x, weight, lora_A, lora_B, magnitude, low_rank, floored, norm, q, scale, *buffers = (
        ctx.saved_tensors
    )
    needs = ctx.needs_input_grad[:8]  # the tensor inputs of forward, in order
    need_x, need_lora_x, need_w, need_bias, need_A, need_B, need_m, need_c = needs
    s, dtype, tokens = ctx.scaling, grad_out.dtype, x2d.shape[0]
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    buffer, weight_a_t = _take_buffers(ctx, *buffers, x2d, lora_x, weight, A, B)
    direction = buffer[:tokens]

    # y = (m/n) ⊙ direction + b: reduce Σ_t g ⊙ direction in place, then the small part.
    grad_scale = direction.mul_(grad_out).sum(0, dtype=norm.dtype)
    grad_sq = grad_B_t = gram_part = None
    if ctx.detach_norm:
        grad_m = grad_scale / norm
    else:
        grad_m, grad_sq, grad_B_t, grad_weight_a_t, gram_part = norm_backward(
            grad_scale, q, weight_a_t, lora_B, magnitude, floored, norm, s
        )
        weight_a_t.copy_(grad_weight_a_t)

    # The matmuls with W of g ⊙ m/n and ∂L/∂Pᵀ: the gradients of x and (through P) of A.
    grad_direction = torch.mul(grad_out, scale, out=direction)
    need_p = grad_sq is not None and need_A
    grad_x, grad_A_via_P = _frozen_matmul_grads(
        buffer, weight_a_t, weight, tokens, need_x, need_p, ctx.stack
    )

    # The low-rank branch, as in LoRA, plus the parts through the norm.
    grad_low = (grad_direction @ B).mul_(s)
    grad_A = grad_B = None
    if need_B:  # (g ⊙ m/n)ᵀ(A x) as m/n ⊙ gᵀ(A x): m/n in float32 cannot overflow float16 here
        grad_B = torch.mul(grad_out.T @ low_rank, scale.unsqueeze(1)).mul_(s)
        if grad_B_t is not None:
            grad_B = torch.add(grad_B, grad_B_t.T)  # float32 like the norm; keeps B's layout
    if need_A:
        grad_A = grad_low.T @ (x2d if lora_x is None else lora_x)
        if need_p:
            grad_A = torch.addmm(grad_A.to(norm.dtype), gram_part, lora_A.to(norm.dtype), alpha=s)
            grad_A = grad_A.add_(grad_A_via_P)
    grad_lora_x = None
    if lora_x is None and need_x:
        grad_x.addmm_(grad_low, A)
    elif need_lora_x:
        grad_lora_x = grad_low @ A

    grad_w = None
    if need_w:
        grad_w = grad_direction.T @ x2d
        if grad_sq is not None:
            grad_w.addmm_(weight_a_t.T, A)
    return (
        grad_x,
        grad_lora_x,
        grad_w,
        grad_out.sum(0) if need_bias else None,
        cast(grad_A, lora_A.dtype) if need_A else None,
        cast(grad_B, lora_B.dtype) if need_B else None,
        grad_m.to(magnitude.dtype) if need_m else None,
        grad_sq if need_c else None,
    )


class LoRALinearFunction(torch.autograd.Function):
    """:func:`~torchdora.functional.lora_linear` on 2-D inputs, with its backward written out.

    Autograd reaches ``x`` by two paths (``W`` and ``A``) and so holds two ``T × d_in``
    gradients at once before adding them; here the low-rank part is added into the frozen
    matmul's gradient in place (one ``T × d_in`` tensor fewer at the peak, one pass less).
    """

    @staticmethod
    def forward(ctx, x2d, lora_x, weight, bias, lora_A, lora_B, scaling):
        lora_in = x2d if lora_x is None else lora_x
        A, B = lora_A.to(x2d.dtype), lora_B.to(x2d.dtype)
        low_rank = F.linear(lora_in, A)
        out = F.linear(x2d, weight, bias).addmm_(low_rank, B.T, alpha=scaling)
        ctx.save_for_backward(x2d, lora_x, weight, lora_A, lora_B, low_rank)
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2d, lora_x, weight, lora_A, lora_B, low_rank = ctx.saved_tensors
        need_x, need_lora_x, need_w, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        with autocast_off(grad_out):
            A, B = lora_A.to(grad_out.dtype), lora_B.to(grad_out.dtype)
            grad_low = (grad_out @ B).mul_(ctx.scaling)
            grad_x = grad_lora_x = None
            if need_x:
                grad_x = grad_out @ weight
                if lora_x is None:
                    grad_x.addmm_(grad_low, A)
            if need_lora_x:
                grad_lora_x = grad_low @ A
            lora_in = x2d if lora_x is None else lora_x
            return (
                grad_x,
                grad_lora_x,
                grad_out.T @ x2d if need_w else None,
                grad_out.sum(0) if need_bias else None,
                (grad_low.T @ lora_in).to(lora_A.dtype) if need_A else None,
                (grad_out.T @ low_rank).mul_(ctx.scaling).to(lora_B.dtype) if need_B else None,
                None,
            )
