"""torchdora: exact, fast DoRA (Weight-Decomposed Low-Rank Adaptation) for PyTorch."""

from torchdora.config import DoRAConfig
from torchdora.layers import (
    DoRAConv,
    DoRAConv1D,
    DoRAEmbedding,
    DoRALayer,
    DoRALinear,
    LayerKind,
    LoRALinear,
    recommended_defaults,
    register_layer_kind,
)
from torchdora.model import (
    DEFAULT_TARGET_MODULES,
    ModulesToSaveWrapper,
    apply_dora,
    count_trainable_parameters,
    default_target_modules,
    disable_adapter,
    dora_modules,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    unmerge_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "DoRAConfig",
    "DoRAConv",
    "DoRAConv1D",
    "DoRAEmbedding",
    "DoRALayer",
    "DoRALinear",
    "LayerKind",
    "LoRALinear",
    "ModulesToSaveWrapper",
    "__version__",
    "apply_dora",
    "count_trainable_parameters",
    "default_target_modules",
    "disable_adapter",
    "dora_modules",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "recommended_defaults",
    "register_layer_kind",
    "unmerge_adapter",
]
