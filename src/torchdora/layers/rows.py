"""Mixed-adapter batches: a different adapter (or none) for each row of one batch.

In a batch whose rows belong to different adapters, a DoRA layer runs its frozen base once on
the whole batch and then, per adapter, only that adapter's low-rank branch and per-row scale on
its own rows::

    y[rows_a] = (m_a / n_a) ⊙ (W x[rows_a] + s_a·B_a A_a x[rows_a]) + b

With the scale ``m_a / n_a`` cached in eval mode, nothing per adapter touches a d_out × d_in
matrix (in train mode each adapter's norm costs one ``r``-row pass over ``W``, as for a layer
kind without a stacked matmul). :func:`torchdora.mixed_batch` sets the rows' adapters on every
layer of a model; a layer kind supplies ``_rows_base`` (the base output without bias),
``_rows_low_rank`` (``B A x``, unscaled) and, where they differ from Linear's, ``_rows_bias``
and ``_scale_shape``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdora import functional as DF


class RowAdapters:
    """One adapter name per row of a batch (``None``: the base model for that row)."""

    def __init__(self, names: list[str | None] | tuple[str | None, ...]) -> None:
        self.names = tuple(names)
        self._groups: dict[torch.device, list[tuple[str | None, Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def groups(self, device: torch.device) -> list[tuple[str | None, Tensor]]:
        """``(name, row indices)`` per distinct name, in order of first appearance."""
        if device not in self._groups:
            order = dict.fromkeys(self.names)
            self._groups[device] = [
                (
                    name,
                    torch.tensor([i for i, n in enumerate(self.names) if n == name], device=device),
                )
                for name in order
            ]
        return self._groups[device]


def check_rows(layer: nn.Module, x: Tensor, rows: RowAdapters) -> None:
    """Refuse an input whose first dimension is not one row per adapter name."""
    if x.dim() == 0 or x.shape[0] != len(rows):
        raise ValueError(
            f"mixed_batch: {type(layer).__name__} got an input of shape {tuple(x.shape)}, whose "
            f"first dimension should be the batch of {len(rows)} rows that adapter names were "
            "given for; pass one name per row (None for the base model)"
        )
    if layer.merged:
        raise RuntimeError(
            f"mixed_batch: adapter {layer.merged_adapter!r} is merged into the base weight; "
            "unmerge_adapter(model) first"
        )


def forward_rows(layer: nn.Module, x: Tensor, rows: RowAdapters) -> Tensor:
    """A :class:`~torchdora.DoRALayer`'s output, each row of ``x`` computed by its own adapter
    (see the module docstring); rows of ``None``, of an adapter this layer lacks, or of a
    disabled layer get the base output."""
    check_rows(layer, x, rows)
    base, bias, out = layer._rows_base(x), layer._rows_bias(), None
    for name, index in rows.groups(x.device):
        adapter = None if layer.disabled or name not in layer.adapters else layer.adapters[name]
        direction = base.index_select(0, index)
        if adapter is None:
            y = direction if bias is None else direction + bias.to(direction.dtype)
        else:
            layer._check_initialized(adapter)
            inputs = x.index_select(0, index)
            dropped = layer._lora_input(inputs, adapter)
            low_rank = layer._rows_low_rank(inputs if dropped is None else dropped, adapter)
            direction = direction + adapter.scaling * low_rank
            if adapter.use_dora:
                scale = layer.magnitude_scale(adapter).view(layer._scale_shape)
                y = DF.rescale(direction, scale, bias)
            else:
                y = direction if bias is None else direction + bias.to(direction.dtype)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, index, y)
    return out
