"""A module trained in full next to the adapters (``DoRAConfig.modules_to_save``)."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from torchdora.layers.rows import RowAdapters


class ModulesToSaveWrapper(nn.Module):
    """Holds the frozen ``original_module`` and a trainable copy per adapter (PEFT's layout).

    ``modules_to_save[name]`` is adapter ``name``'s copy; the forward runs the active adapter's
    (``module_to_save``), or the original when ``disabled`` (see
    :func:`torchdora.disable_adapter`) or when the active adapter has no copy here, so the base
    model stays available. ``merge_and_unload`` puts the trained copy in the wrapper's place.
    """

    def __init__(self, module: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disabled = False
        self.row_adapters: RowAdapters | None = None  # set by torchdora.mixed_batch
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        """A new trainable copy of the original module for adapter ``name``."""
        if name in self.modules_to_save:
            raise ValueError(f"this module already has a copy for adapter {name!r}")
        self.modules_to_save[name] = copy.deepcopy(self.original_module).requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    @property
    def module_to_save(self) -> nn.Module:
        """The copy the forward runs: the active adapter's, else the original module."""
        if self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            return self._forward_rows(*args, **kwargs)
        active = self.original_module if self.disabled else self.module_to_save
        return active(*args, **kwargs)

    def _forward_rows(self, *args, **kwargs) -> Tensor:
        """Each row of a mixed-adapter batch through its adapter's copy (the original for
        ``None`` or an adapter without a copy here): for modules called on one batched tensor."""
        rows = self.row_adapters
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != len(rows):
            raise ValueError(
                "mixed_batch: a modules_to_save module must be called on one tensor whose first "
                f"dimension is the batch of {len(rows)} rows; this one got args of types "
                f"{[type(a).__name__ for a in args]} and keywords {sorted(kwargs)}"
            )
        out = None
        for name, index in rows.groups(x.device):
            copies = dict(self.modules_to_save)
            y = copies.get(name, self.original_module)(x.index_select(0, index))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, index, y)
        return out
