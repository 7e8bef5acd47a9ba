"""Magnitude and direction change of one weight matrix (DoRA paper §2.2, figure 2).

For an original weight ``W⁰`` and an adapted one ``W'`` (both d_out × fan_in, one magnitude per
row), with ``m_i = ‖W_i‖``::

    ΔM = mean_i |m'_i − m⁰_i|          ΔD = mean_i (1 − cos(W'_i, W⁰_i))

Everything is computed in float64: ``ΔD`` is second order in the update, so early in training
it is far below float32's resolution of ``cos``. A row of zero norm has no direction; its
cosine is taken as 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from torchdora import functional as DF

#: Rows of a weight are converted to float64 in blocks of at most this many elements.
BLOCK_ELEMENTS = 1 << 22


class LayerChange(NamedTuple):
    """``(ΔM, ΔD)`` of one layer: mean magnitude change and mean direction change."""

    delta_m: float
    delta_d: float


def _float64_row_blocks(*matrices: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """The same block of rows of each matrix, in float64, ``BLOCK_ELEMENTS`` at a time.

    So a float64 copy of a whole layer never exists, only of a block of its rows.
    """
    rows, cols = matrices[0].shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield tuple(m[start : start + step].to(torch.float64) for m in matrices)


def row_norms(matrix: Tensor) -> Tensor:
    """``‖W_i‖`` per row in float64, shape ``(d_out,)``."""
    return torch.cat([block.norm(dim=1) for (block,) in _float64_row_blocks(matrix)])


def _change(original_norm: Tensor, new_norm: Tensor, dot: Tensor, magnitude: Tensor) -> LayerChange:
    """``ΔM``, ``ΔD`` from per-row ``‖W⁰_i‖``, ``‖V_i‖``, ``⟨V_i, W⁰_i⟩`` and the new magnitude."""
    denominator = original_norm * new_norm
    cos = (dot / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)).clamp(-1.0, 1.0)
    delta_m = (magnitude - original_norm).abs().mean()
    delta_d = (1.0 - cos).mean()
    return LayerChange(delta_m.item(), delta_d.item())


def dense_change(original: Tensor, adapted: Tensor) -> LayerChange:
    """``(ΔM, ΔD)`` between two dense weights of the same shape ``(d_out, fan_in)``."""
    if original.dim() != 2 or original.shape != adapted.shape:
        raise ValueError(
            "dense_change needs two matrices of the same shape (d_out, fan_in), got "
            f"{tuple(original.shape)} and {tuple(adapted.shape)}"
        )
    norms, new_norms, dots = [], [], []
    for before, after in _float64_row_blocks(original, adapted):
        norms.append(before.norm(dim=1))
        new_norms.append(after.norm(dim=1))
        dots.append((before * after).sum(dim=1))
    new_norm = torch.cat(new_norms)
    return _change(torch.cat(norms), new_norm, torch.cat(dots), new_norm)


def weight_products(weight: Tensor, lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """``c = ‖W_i‖²`` and ``P = W Aᵀ`` in float64, from row blocks of ``W`` (d_out × fan_in)."""
    A = lora_A.detach().to(torch.float64)
    sq_norms, products = [], []
    for (block,) in _float64_row_blocks(weight.detach()):
        sq_norms.append(block.square().sum(dim=1))
        products.append(block @ A.T)
    return torch.cat(sq_norms), torch.cat(products)


def factored_change(
    weight_sq_norm: Tensor,
    weight_a: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    normalize: bool = True,
) -> LayerChange:
    """``(ΔM, ΔD)`` of ``V = W + s·B A`` against ``W`` without forming ``B A``.

    ``‖V_i‖`` is :func:`torchdora.functional.factored_row_norm`, and
    ``⟨V_i, W_i⟩ = ‖W_i‖² + s·Σ_r B_ir (W Aᵀ)_ir``, so only d_out × r pieces are needed.

    Args:
        weight_sq_norm: ``c = ‖W_i‖²``, shape ``(d_out,)``.
        weight_a: ``P = W Aᵀ``, shape ``(d_out, r)``.
        lora_A: ``(r, fan_in)``.
        lora_B: ``(d_out, r)``.
        scaling: ``s``.
        magnitude: DoRA's ``m``, whose row ``i`` makes ``W'_i = m_i·V_i/‖V_i‖`` (new magnitude
            ``|m_i|``, direction reversed where ``m_i < 0``); ``None`` for LoRA, whose new
            magnitude is ``‖V_i‖``.
        normalize: ``False`` for DoRA without normalisation, ``W'_i = m_i·V_i/‖W_i‖``: its new
            magnitude is ``|m_i|·‖V_i‖/‖W_i‖``.
    """
    c = weight_sq_norm.to(torch.float64)
    P = weight_a.to(torch.float64)
    A, B = lora_A.detach().to(torch.float64), lora_B.detach().to(torch.float64)
    new_norm = DF.factored_row_norm(c, P, A, B, scaling, eps=0.0)
    dot = c + scaling * (B * P).sum(dim=1)
    if magnitude is None:
        return _change(c.sqrt(), new_norm, dot, new_norm)
    # W'_i = m_i·V_i/‖V_i‖: its norm is |m_i|, and a negative m_i turns it around.
    m = magnitude.detach().to(torch.float64)
    if not normalize:
        m = m * new_norm / c.sqrt()
    return _change(c.sqrt(), new_norm, dot * m.sign(), m.abs())
