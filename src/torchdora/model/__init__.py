"""Whole-model DoRA: inject into any model, merge, unload, disable, count."""

from torchdora.model.adapters import active_adapter, adapter_names, delete_adapter, set_adapter
from torchdora.model.checks import NonFiniteError, assert_finite, check_finite_outputs
from torchdora.model.combine import combine_adapters
from torchdora.model.deferred import adapted_state_dict, initialize_magnitude
from torchdora.model.inject import apply_dora
from torchdora.model.mixed import mixed_batch
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
    "NonFiniteError",
    "active_adapter",
    "adapted_state_dict",
    "adapter_names",
    "apply_dora",
    "assert_finite",
    "check_finite_outputs",
    "combine_adapters",
    "count_trainable_parameters",
    "default_target_modules",
    "delete_adapter",
    "disable_adapter",
    "dora_modules",
    "initialize_magnitude",
    "merge_adapter",
    "merge_and_unload",
    "mixed_batch",
    "print_trainable_parameters",
    "set_adapter",
    "unmerge_adapter",
]
