"""Merging one adapter of a DoRA layer into its base weight, and taking it out again.

One adapter is merged at a time: a DoRA adapter's norm is taken over its own ``W + s·B A``, so a
second adapter merged on top of the first would not compute what either adapter does.
"""

from __future__ import annotations

import torch
from torch import nn

from torchdora import functional as DF
from torchdora.distributed import is_dtensor


class AdapterMerging:
    """The merge methods of :class:`~torchdora.DoRALayer` (a part of that class)."""

    def merge(self, adapter_name: str | None = None) -> None:
        """Write ``W'`` of ``adapter_name`` (default: the active adapter) into the base weight;
        the forward then runs the base layer alone. One adapter is merged at a time."""
        name = self.active_adapter if adapter_name is None else adapter_name
        if self.merged_adapter == name:
            return
        adapter = self.get_adapter(name)
        if self.merged:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged already; unmerge() before merging "
                f"{name!r} (the norm of a DoRA adapter is taken over its own W + s·B A, so two "
                "merged DoRA adapters would not compute what either adapter does)"
            )
        self._check_initialized(adapter)
        if is_dtensor(self.base_weight):
            raise RuntimeError(
                "merging a sharded (FSDP2) layer is not supported: save the adapter "
                "(save_adapter gathers it) and merge in one process (load_adapter, then "
                "merge_and_unload)"
            )
        with torch.no_grad():
            merged, self._merge_norm = DF.merge_weight(
                self.weight_matrix(),
                adapter.lora_A,
                adapter.lora_B,
                adapter.magnitude,
                adapter.scaling,
                adapter.eps,
                normalize=adapter.normalize,
            )
            self.store_weight_matrix(merged)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Restore the base weight ``W`` (to rounding) after :meth:`merge`."""
        if not self.merged:
            return
        adapter = self.get_adapter(self.merged_adapter)
        with torch.no_grad():
            self.store_weight_matrix(
                DF.unmerge_weight(
                    self.weight_matrix(),
                    adapter.lora_A,
                    adapter.lora_B,
                    adapter.magnitude,
                    adapter.scaling,
                    self._merge_norm,
                )
            )
        self._merge_norm = None
        self.merged_adapter = None

    def merge_and_unload(self, adapter_name: str | None = None) -> nn.Module:
        """Merge ``adapter_name`` (default: the active adapter) in place and return the base
        layer, now a plain module holding its ``W'``; the other adapters are dropped with it."""
        self.merge(adapter_name)
        return self.base_layer
