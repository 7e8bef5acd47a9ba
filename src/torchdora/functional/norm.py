"""The factored row norm ``n_i = ‖W_i + s·(B A)_i‖`` and the per-row scale ``m / n``.

Nothing here builds a d_out × d_in matrix: with ``c = ‖W_i‖²``, ``P = W Aᵀ`` and ``G = A Aᵀ``::

    n_i² = c_i + 2s·Σ_r B_ir P_ir + s²·Σ_r (B G)_ir B_ir

every term is ``d_out × r`` or smaller (``docs/design.md``, "Never build the d_out × d_in
matrix"). Norms are computed in at least float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchdora.functional.autocast import cast


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
    sq, _ = sq_norm_terms(weight_sq_norm, weight_a.T, lora_A, lora_B, scaling)
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


def sq_norm_terms(
    weight_sq_norm: Tensor, weight_a_t: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """``n²`` per row before the floor, and the ``r × d_out`` matrix ``Q`` it is made of.

    ``n² = c + 2s·Σ B⊙P + s²·Σ (B G)⊙B = c + s·Σ_r Bᵀ⊙Q`` with ``Q = 2Pᵀ + s·G Bᵀ``: one
    ``addmm`` and one row reduction. The backward reuses ``Q`` (``Q − Pᵀ = Pᵀ + s·G Bᵀ``).
    """
    dtype = weight_sq_norm.dtype
    A, B_t = cast(lora_A, dtype), cast(lora_B, dtype).t()
    q = torch.addmm(cast(weight_a_t, dtype), torch.mm(A, A.t()), B_t, beta=2.0, alpha=scaling)
    return torch.add(weight_sq_norm, (B_t * q).sum(0), alpha=scaling), q


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
    sq, q = sq_norm_terms(weight_sq_norm, weight_a_t, lora_A, lora_B, scaling)
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
