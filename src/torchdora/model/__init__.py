"""Whole-model DoRA: inject into any model, merge, unload, disable, count."""

from torchdora.model.inject import apply_dora
from torchdora.model.modules_to_save import ModulesToSaveWrapper
from torchdora.model.ops import (
    count_trainable_parameters,
    disable_adapter,
    dora_modules,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    unmerge_adapter,
)
from torchdora.model.targeting import DEFAULT_TARGET_MODULES, default_target_modules

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ModulesToSaveWrapper",
    "apply_dora",
    "count_trainable_parameters",
    "default_target_modules",
    "disable_adapter",
    "dora_modules",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "unmerge_adapter",
]
