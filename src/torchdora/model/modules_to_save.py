"""A module trained in full next to the adapters (``DoRAConfig.modules_to_save``)."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Holds the frozen ``original_module`` and a trainable copy, ``module_to_save``.

    The forward runs the copy; with ``disabled = True`` (see :func:`torchdora.disable_adapter`)
    it runs the original, so the base model stays available. ``merge_and_unload`` puts the
    trained copy in the wrapper's place.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.module_to_save = copy.deepcopy(module).requires_grad_(True)
        self.disabled = False

    def forward(self, *args, **kwargs):
        active = self.original_module if self.disabled else self.module_to_save
        return active(*args, **kwargs)
