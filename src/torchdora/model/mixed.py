"""``mixed_batch``: one batch, a different adapter for each of its rows.

PEFT refuses ``adapter_names`` for DoRA; here every row of the batch gets exactly what running
it alone with its adapter gives, while the frozen base runs once for the whole batch (see
:mod:`torchdora.layers.rows`). It works under ``generate``: the KV cache keeps the batch's rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from torchdora.layers.base import DoRALayer
from torchdora.layers.rows import RowAdapters
from torchdora.model.adapters import adapter_holders, attribute_set, check_known


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch ``model`` computes uses ``adapter_names[i]``.

    ``None`` runs that row on the base model. Names need not be active; gradients reach the
    adapters whose parameters require them (:func:`~torchdora.set_adapter` freezes all but the
    active one: unfreeze others with ``requires_grad_`` to train several at once). A batch whose
    first dimension is not ``len(adapter_names)``, an unknown name, or a merged adapter is an
    error. Nesting replaces the outer block's names until the inner block ends.

    Example::

        with torchdora.mixed_batch(model, ["sql", "chat", None, "sql"]):
            logits = model(**batch).logits  # batch of 4 rows
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            "mixed_batch expects a list with one adapter name (or None) per row, got "
            f"{type(adapter_names).__name__} {adapter_names!r}"
        )
    if not adapter_names:
        raise ValueError("mixed_batch needs one adapter name per row of the batch, got none")
    holders = [module for _, module in adapter_holders(model)]
    if not holders:
        raise ValueError("mixed_batch: the model has no torchdora adapters; apply_dora first")
    for name in dict.fromkeys(adapter_names):
        if name is not None:
            check_known(model, name)
    merged = [m.merged_adapter for m in holders if isinstance(m, DoRALayer) and m.merged]
    if merged:
        raise RuntimeError(
            f"mixed_batch: adapter {merged[0]!r} is merged into the base weights; "
            "unmerge_adapter(model) first"
        )
    with attribute_set(holders, "row_adapters", RowAdapters(adapter_names)):
        yield model
