"""DoRA on ``transformers``' ``Conv1D`` (GPT-2 and relatives): a linear layer storing ``Wᵀ``."""

from __future__ import annotations

from torch import Tensor, nn

from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_RANK
from torchdora.layers.linear import DoRALinear


class DoRAConv1D(DoRALinear):
    """:class:`~torchdora.DoRALinear` on a ``transformers.pytorch_utils.Conv1D`` base.

    ``Conv1D`` computes ``y = x W_s + b`` with its weight stored as ``W_s`` of shape
    ``(in_features, out_features)`` (PEFT's ``fan_in_fan_out=True``). DoRA acts on the rows of
    ``W = W_sᵀ`` exactly as for ``nn.Linear``: one magnitude per output feature, ``A`` is
    ``r × in_features`` and ``B`` is ``out_features × r``. The forward and merge read and write
    ``W_s`` through the transposed view, so nothing is copied.

    Args:
        base_layer: the ``Conv1D`` to adapt (kept by reference, not copied).
        rank, alpha: ``r`` and the scale numerator, ``s = alpha / r``.
        **options: the adapter options of :class:`~torchdora.layers.base.DoRALayer`.

    Shapes:
        ``forward``: ``(..., in_features)`` → ``(..., out_features)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        **options,
    ) -> None:
        weight = getattr(base_layer, "weight", None)
        if type(base_layer).__name__ != "Conv1D" or weight is None or weight.dim() != 2:
            raise TypeError(
                f"DoRAConv1D expects a transformers Conv1D, got {type(base_layer).__name__}"
            )
        in_features, out_features = weight.shape
        super().__init__(in_features, out_features, rank, alpha, base_layer=base_layer, **options)

    fan_in_fan_out = True

    @property
    def base_weight(self) -> Tensor:
        """``W`` as ``(out_features, in_features)``: a transposed view of the stored weight."""
        return self.base_layer.weight.T
