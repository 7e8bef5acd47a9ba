"""Pure DoRA maths: the factored row norm, the fused linear forward, and merge/unmerge.

DoRA adapts a frozen weight ``W`` (d_out × d_in) with a low-rank pair ``A`` (r × d_in),
``B`` (d_out × r) and a magnitude ``m`` (d_out)::

    V = W + s·B·A,    n_i = ‖V_i‖₂,    W' = diag(m / n) · V

Nothing on the training path here builds a d_out × d_in matrix. The row norms factor
through small matrices (DESIGN.md §1.1)::

    n_i² = c_i + 2s·Σ_r B_ir P_ir + s²·Σ_r (B G)_ir B_ir,   c = ‖W_i‖², P = W Aᵀ, G = A Aᵀ

and ``P`` comes out of the same frozen matmul that produces ``W x``. The numbers behind each
choice below are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


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


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``m/n`` multiplies outputs of ``dtype`` in.

    float16 ends at 65504, which ``m/n`` passes on a row whose norm is small even where the
    output ``(m/n)·V x`` fits: float16 outputs are scaled by a float32 ``m/n`` and rounded
    once. Every other dtype holds ``m/n`` itself.
    """
    return torch.float32 if dtype == torch.float16 else dtype


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
        eps: absolute lower bound of the result.

    Returns:
        ``n`` of shape ``(d_out,)`` in ``weight_sq_norm``'s dtype (at least float32), as
        ``sqrt(max(n², floor))`` with :func:`sq_norm_floor`: finite, and with a zero gradient
        on floored rows.
    """
    sq, _ = _sq_norm_terms(weight_sq_norm, weight_a.T, lora_A, lora_B, scaling)
    return torch.maximum(sq, sq_norm_floor(weight_sq_norm, weight_a.dtype, eps)).sqrt()


def sq_norm_floor(weight_sq_norm: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """The least ``n²`` a row is given: ``max(eps², 2ε·‖W_i‖²)``, ε the machine epsilon of
    ``dtype`` (``P``'s) or of the norm's dtype, whichever is coarser.

    Where the update cancels a row (``s·B_i A ≈ −W_i``) the factored ``n²`` is a difference of
    terms of size ``‖W_i‖²`` and keeps their rounding, about ``2ε·‖W_i‖²``, while the direction
    ``W x + s·B A x`` keeps its own; below that ``n`` is noise, and ``m/n`` would blow the
    direction's noise up past ``|m_i|·‖x‖``, the bound ``|y_i − b_i|`` has exactly. (In
    bfloat16 that floor is ``n ≥ 0.09·‖W_i‖``: ``P`` comes out of a bfloat16 matmul.)
    """
    machine_eps = max(torch.finfo(dtype).eps, torch.finfo(weight_sq_norm.dtype).eps)
    return (weight_sq_norm.detach() * (2.0 * machine_eps)).clamp_min_(eps * eps)  # a constant


def _sq_norm_terms(
    weight_sq_norm: Tensor, weight_a_t: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """``n²`` per row before the floor, and the ``r × d_out`` matrix ``Q`` it is made of.

    ``n² = c + 2s·Σ B⊙P + s²·Σ (B G)⊙B = c + s·Σ_r Bᵀ⊙Q`` with ``Q = 2Pᵀ + s·G Bᵀ``: one
    ``addmm`` and one row reduction. The backward reuses ``Q`` (``Q − Pᵀ = Pᵀ + s·G Bᵀ``).
    """
    dtype = weight_sq_norm.dtype
    A, B_t = lora_A.to(dtype), lora_B.to(dtype).T
    q = torch.addmm(weight_a_t.to(dtype), A @ A.T, B_t, beta=2.0, alpha=scaling)
    return torch.add(weight_sq_norm, (B_t * q).sum(0), alpha=scaling), q


STACK_MAX_TOKENS_PER_OUT = 0.5
"""See :func:`stack_base_matmul`: stack while ``T · itemsize ≤ this · d_out · 4``."""


def stack_base_matmul(tokens: int, weight: Tensor, rank: int) -> bool:
    """Whether the forward runs the frozen matmul once over ``[x; A]`` rather than twice.

    Stacking copies ``x`` into the ``(T + r) × d_in`` stacked input (a fresh allocation and a
    pass over ``T × d_in``); the separate ``W Aᵀ`` reads all of ``W`` again for only ``r``
    rows, at a fraction of the matmul's peak. The copy grows with ``T``, the extra read with
    ``d_out``: measured on CPU (``benchmarks/stack_rule.py``), stacking wins up to about
    ``T = 0.5·d_out`` tokens in float32 (``T = d_out`` in 16-bit), at every rank we tried.
    The backward follows the forward's choice.
    """
    return tokens * weight.element_size() <= STACK_MAX_TOKENS_PER_OUT * 4 * weight.shape[0]


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
            :func:`stack_base_matmul`.

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
        out = _dora_linear_autograd(x2d, lora_x, weight, bias, *adapter)
    else:
        with _autocast_off(x) as dtype:
            x2d, lora_x, weight, bias = (_cast(t, dtype) for t in (x2d, lora_x, weight, bias))
            out = DoRALinearFunction.apply(x2d, lora_x, weight, bias, *adapter)
    return out.reshape(*lead, weight.shape[0])  # -1 is ambiguous with 0 tokens


def _dora_linear_autograd(
    x2d, lora_x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, eps,
    detach_norm, stack,
) -> Tensor:  # fmt: skip
    """:func:`dora_linear` in plain autograd ops, for ``torch.compile`` to trace and fuse."""
    base, weight_a = base_and_weight_a(x2d, weight, lora_A, stack)
    norm = factored_row_norm(weight_sq_norm, weight_a, lora_A, lora_B, scaling, eps)
    if detach_norm:
        norm = norm.detach()
    scale = (magnitude.to(norm.dtype) / norm).to(scale_dtype(x2d.dtype))
    direction = add_lora(base, x2d if lora_x is None else lora_x, lora_A, lora_B, scaling)
    return rescale(direction, scale, bias)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


SMALL_NORM_MAX_FLOPS = 2**24
"""The ``d_out·r²`` size up to which the norm's ``d_out × r`` part runs on one thread."""
SMALL_MATMUL_MAX_FLOPS = 2**24
"""The ``r·d_out·d_in`` size up to which ``W Aᵀ`` on its own (not stacked) runs on one thread."""
SMALL_PASS_MAX_ELEMENTS = 3 * 2**19
"""The ``T·d_out`` size up to which DoRA's elementwise passes over the output run on one thread."""


class SmallWork(NamedTuple):
    """Which of DoRA's own parts of one call run on one CPU thread (see :func:`_one_thread`).

    Measured by ``benchmarks/thread_rule.py`` under ``OMP_WAIT_POLICY=PASSIVE`` on 2 cores
    (``benchmarks/RESULTS.md``): waking the second thread costs 60–150 µs per parallel region,
    more than these parts' work when it is small. E.g. ``W Aᵀ`` (r = 16, 384 × 384) took 169 µs
    on two threads and 61 µs on one; a rescale pass over 1024 × 384 took 90 µs and 36 µs. The
    thresholds sit where the two were even.
    """

    norm: bool
    weight_a: bool
    passes: bool

    @classmethod
    def of(cls, tokens: int, weight: Tensor, rank: int) -> SmallWork:
        if weight.device.type != "cpu" or torch.get_num_threads() == 1:
            return cls(False, False, False)
        d_out, d_in = weight.shape
        return cls(
            norm=d_out * rank * rank <= SMALL_NORM_MAX_FLOPS,
            weight_a=rank * d_out * d_in <= SMALL_MATMUL_MAX_FLOPS,
            passes=tokens * d_out <= SMALL_PASS_MAX_ELEMENTS,
        )


@contextmanager
def _one_thread(small: bool) -> Iterator[None]:
    """Run a block on one CPU thread when ``small`` (a :class:`SmallWork` field), then restore.

    Each op in such a block is microseconds of work, but every parallel region wakes the whole
    OpenMP team, and with sleeping workers (``OMP_WAIT_POLICY=PASSIVE``, what a shared machine
    wants) that wake-up dominates. Switching the thread count costs well under a microsecond.
    The thread count is process-wide: another Python thread's ops in this window run on one
    thread too.
    """
    if not small:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def autocast_enabled(like: Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``like``'s device type."""
    device = like.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


@contextmanager
def _autocast_off(like: Tensor) -> Iterator[torch.dtype]:
    """Switch autocast off for a block, yielding the dtype it should compute in.

    :class:`DoRALinearFunction` mixes dtypes on purpose (the norm in float32) and writes into
    buffers in place, which autocast's per-op casting would break; it casts once instead.
    """
    if not autocast_enabled(like):
        yield like.dtype
        return
    device = like.device.type
    with torch.autocast(device, enabled=False):
        yield torch.get_autocast_dtype(device) if like.is_floating_point() else like.dtype


def _direction_buffer(
    x2d: Tensor, lora_x: Tensor | None, weight: Tensor, A: Tensor, B: Tensor, scaling: float,
    stack: bool, small: SmallWork,
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
        with _one_thread(small.weight_a):
            weight_a_t = F.linear(A, weight)
    low_rank = F.linear(x2d if lora_x is None else lora_x, A)
    buffer[:tokens].addmm_(low_rank, B.T, alpha=scaling)
    return buffer, weight_a_t, low_rank


class DoRALinearFunction(torch.autograd.Function):
    """:func:`dora_linear` on 2-D inputs, with its backward written out.

    Why not plain autograd (``benchmarks/RESULTS.md``): autograd keeps the direction
    ``W x + s·B A x`` for the gradient of ``m/n``, allocates ``g ⊙ direction`` to reduce it,
    and assembles the stacked matmul's gradient in yet another ``(T + r) × d_out`` tensor.
    Here the backward reduces ``Σ_t g ⊙ direction`` in place in the saved buffer, then writes
    ``g ⊙ m/n`` over the direction and ``∂L/∂(W Aᵀ)`` over ``W Aᵀ`` (stacked: one matmul with
    ``W`` then gives the gradients of ``x`` and, through ``W Aᵀ``, of ``A``). The step holds
    one ``T × d_out`` tensor more than LoRA, and never a ``d_out × d_in`` one unless ``W``
    itself is trained.

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
        small = SmallWork.of(tokens, weight, len(A))
        buffer, weight_a_t, low_rank = _direction_buffer(
            x2d, lora_x, weight, A, B, scaling, stack, small
        )
        with _one_thread(small.norm):
            scale, norm, floored, q = norm_forward(
                weight_sq_norm, weight_a_t, lora_A, lora_B, magnitude, scaling, eps
            )
            scale = scale.to(scale_dtype(dtype))
        with _one_thread(small.passes):
            out = rescale(buffer[:tokens], scale, bias)
        saved = (x2d, lora_x, weight, lora_A, lora_B, magnitude, low_rank, floored, norm, q, scale)
        # Stacked, Pᵀ is the buffer's last rows: saving it apart would let a saved-tensor hook
        # (offloading) unpack two copies, and the backward writes ∂L/∂Pᵀ through that view.
        ctx.save_for_backward(*saved, buffer, None if stack else weight_a_t)
        ctx.scaling, ctx.detach_norm, ctx.stack = scaling, detach_norm, stack
        ctx.small = small
        ctx.buffer_consumed = False
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with _autocast_off(grad_out):
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
        buffer, weight_a_t, _ = _direction_buffer(
            x2d, lora_x, weight, A, B, ctx.scaling, ctx.stack, ctx.small
        )
    ctx.buffer_consumed = True
    buffer = buffer.data
    return buffer, (buffer[len(x2d) :] if ctx.stack else weight_a_t.data)


def norm_forward(
    weight_sq_norm: Tensor,
    weight_a_t: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's small part from ``Pᵀ = A Wᵀ`` (r × d_out): ``(m/n, n, floored, Q)``, with
    ``floored`` the rows whose ``n²`` is :func:`sq_norm_floor`'s.

    Few ops on purpose: right after the frozen matmul, each small op costs several times its
    isolated time on CPU (caches refilled), so the op count, not the arithmetic, is the cost.
    """
    sq, q = _sq_norm_terms(weight_sq_norm, weight_a_t, lora_A, lora_B, scaling)
    floor = sq_norm_floor(weight_sq_norm, weight_a_t.dtype, eps)
    norm = torch.maximum(sq, floor).sqrt_()
    return magnitude.to(norm.dtype) / norm, norm, sq < floor, q


def norm_backward(
    grad_scale: Tensor,
    q: Tensor,
    weight_a_t: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    floored: Tensor,
    norm: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward's small part, from ``∂L/∂(m/n)``: ``(∂L/∂m, ∂L/∂n², ∂L/∂Bᵀ, ∂L/∂Pᵀ, K)``.

    With ``n = sqrt(max(n², floor))``: ``∂L/∂n² = −½·(∂L/∂(m/n))·m/n³`` (0 on floored rows),
    ``∂L/∂Pᵀ = 2s·∂L/∂n² ⊙ Bᵀ`` and ``∂L/∂Bᵀ = 2s·∂L/∂n² ⊙ (Pᵀ + s·G Bᵀ) = 2s·∂L/∂n² ⊙ (Q − Pᵀ)``,
    all ``r × d_out``. ``A`` gets ``s·K A`` through ``G = A Aᵀ``, with ``K = (∂L/∂Pᵀ) B``
    (``r × r``), and ``(∂L/∂Pᵀ) W`` through ``P`` (the caller's matmul).
    """
    dtype = norm.dtype
    B = lora_B.to(dtype)
    grad_m = grad_scale / norm
    grad_sq = (grad_m * magnitude.to(dtype)).div_(norm * norm).mul_(-0.5)
    grad_sq = grad_sq.masked_fill_(floored, 0.0)
    grad_sq_2s = grad_sq * (2.0 * scaling)
    grad_weight_a_t = B.T * grad_sq_2s
    grad_B_t = torch.sub(q, weight_a_t).mul_(grad_sq_2s)
    return grad_m, grad_sq, grad_B_t, grad_weight_a_t, grad_weight_a_t @ B


def _frozen_matmul_grads(
    buffer: Tensor, weight_a_t: Tensor, weight: Tensor, tokens: int, need_x: bool, need_p: bool,
    small: SmallWork, stack: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """``(∂L/∂direction) W`` and ``(∂L/∂Pᵀ) W`` (``None`` where not needed).

    Stacked, one matmul over the buffer's rows gives both, as the forward's did.
    """
    if not stack:
        grad_x = buffer @ weight if need_x else None
        if not need_p:
            return grad_x, None
        with _one_thread(small.weight_a):
            return grad_x, weight_a_t @ weight
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
    small = ctx.small
    with _one_thread(small.passes):
        grad_scale = direction.mul_(grad_out).sum(0, dtype=norm.dtype)
    grad_sq = grad_B_t = gram_part = None
    if ctx.detach_norm:
        grad_m = grad_scale / norm
    else:
        with _one_thread(small.norm):
            grad_m, grad_sq, grad_B_t, grad_weight_a_t, gram_part = norm_backward(
                grad_scale, q, weight_a_t, lora_B, magnitude, floored, norm, s
            )
            weight_a_t.copy_(grad_weight_a_t)

    # The matmuls with W of g ⊙ m/n and ∂L/∂Pᵀ: the gradients of x and (through P) of A.
    with _one_thread(small.passes):
        grad_direction = torch.mul(grad_out, scale, out=direction)
    need_p = grad_sq is not None and need_A
    grad_x, grad_A_via_P = _frozen_matmul_grads(
        buffer, weight_a_t, weight, tokens, need_x, need_p, small, ctx.stack
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
        _cast(grad_A, lora_A.dtype) if need_A else None,
        _cast(grad_B, lora_B.dtype) if need_B else None,
        grad_m.to(magnitude.dtype) if need_m else None,
        grad_sq if need_c else None,
    )


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
        with _autocast_off(x) as dtype:
            x2d, lora_x, weight, bias = (_cast(t, dtype) for t in (x2d, lora_x, weight, bias))
            out = LoRALinearFunction.apply(x2d, lora_x, weight, bias, lora_A, lora_B, scaling)
    return out.reshape(*lead, weight.shape[0])  # -1 is ambiguous with 0 tokens


class LoRALinearFunction(torch.autograd.Function):
    """:func:`lora_linear` on 2-D inputs, with its backward written out.

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
        with _autocast_off(grad_out):
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


def rescale(direction: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``direction ⊙ scale + bias`` in ``direction``'s dtype, ``scale`` and ``bias`` broadcast
    against it; float16 is multiplied in float32 and rounded once (see :func:`scale_dtype`)."""
    dtype = direction.dtype
    scale = scale.to(scale_dtype(dtype))
    if bias is None:
        out = direction * scale
    else:
        out = torch.addcmul(bias.to(scale.dtype), direction, scale)
    return out if out.dtype == dtype else out.to(dtype)


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
