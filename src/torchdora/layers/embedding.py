"""DoRA on an ``nn.Embedding`` base, with PEFT's convention for where the magnitude lives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_RANK
from torchdora.layers.adapter import DoRAAdapter
from torchdora.layers.base import DoRALayer


class DoRAEmbedding(DoRALayer):
    """An embedding table ``E`` (``num_embeddings × embedding_dim``) adapted with DoRA.

    As in PEFT, the matrix DoRA normalises is ``Eᵀ`` (``embedding_dim × num_embeddings``): one
    magnitude per embedding dimension, each the norm of a column of ``E`` over the vocabulary.
    ``A`` is ``r × num_embeddings`` and ``B`` is ``embedding_dim × r`` (PEFT's
    ``lora_embedding_A`` / ``lora_embedding_B``), the adapted table is
    ``E' = (E + s·(B A)ᵀ) · diag(m / n)`` and a lookup is
    ``y = (m/n) ⊙ (E[x] + s·Aᵀ[x] Bᵀ)``; ``P = W Aᵀ = (A E)ᵀ`` is one ``r``-row pass over ``E``.

    Initialisation follows PEFT's for embeddings, whatever ``init`` says: ``A = 0`` and
    ``B ~ N(0, 1)`` (a lookup of ``A`` is the branch's input; Kaiming over the vocabulary would
    make it vanish). Dropout does not apply: the input is indices. An ``embed_scale`` attribute
    on the base (scaled word embeddings, e.g. Gemma's) also scales the low-rank branch, and
    ``padding_idx`` applies to the lookups of ``E`` and ``Aᵀ`` (as in PEFT): column ``padding_idx``
    of ``A`` gets no gradient from lookups.

    Args:
        base_layer: the ``nn.Embedding`` to adapt (kept by reference, not copied).
        rank, alpha: ``r`` and the scale numerator, ``s = alpha / r``.
        **options: the adapter options of :class:`~torchdora.layers.base.DoRALayer`.

    Shapes:
        ``forward``: integer ``(...)`` → ``(..., embedding_dim)``.
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        **options,
    ) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(
                f"DoRAEmbedding expects an nn.Embedding, got {type(base_layer).__name__}"
            )
        if base_layer.max_norm is not None or base_layer.scale_grad_by_freq:
            raise ValueError(
                "DoRAEmbedding does not support nn.Embedding with max_norm (it rewrites the "
                f"table during lookups) or scale_grad_by_freq; got max_norm={base_layer.max_norm}, "
                f"scale_grad_by_freq={base_layer.scale_grad_by_freq}"
            )
        super().__init__(
            base_layer,
            base_layer.num_embeddings,
            base_layer.embedding_dim,
            rank=rank,
            alpha=alpha,
            **options,
        )

    PEFT_FACTOR_KEYS = ("lora_embedding_A", "lora_embedding_B")

    def weight_matrix(self, weight: Tensor | None = None) -> Tensor:
        return (self.base_weight if weight is None else weight).T

    def reset_lora_factors(self, adapter: DoRAAdapter | None = None) -> None:
        adapter = adapter or self.get_adapter()
        nn.init.zeros_(adapter.lora_A)
        nn.init.normal_(adapter.lora_B)

    def _low_rank(self, x: Tensor, adapter: DoRAAdapter, dtype: torch.dtype) -> Tensor:
        """``B Aᵀ[x]`` (times the base's ``embed_scale``, if any), in ``dtype``."""
        base = self.base_layer
        after_a = F.embedding(x, adapter.lora_A.T, padding_idx=base.padding_idx)
        low_rank = after_a.to(dtype) @ adapter.lora_B.to(dtype).T
        embed_scale = getattr(base, "embed_scale", None)
        return low_rank if embed_scale is None else low_rank * embed_scale

    def _rows_base(self, x: Tensor) -> Tensor:
        return self.base_layer(x)

    def _rows_low_rank(self, x: Tensor, adapter: DoRAAdapter) -> Tensor:
        return self._low_rank(x, adapter, self.base_weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None:
            return self._forward_rows(x)
        result = self.base_layer(x)
        adapter = self._computing_adapter()
        if adapter is None:
            return result
        direction = result + adapter.scaling * self._low_rank(x, adapter, result.dtype)
        if not adapter.use_dora:
            return direction
        return DF.rescale(direction, self.magnitude_scale(adapter))
