"""Deferred initialisation: adapters built on the ``meta`` device, filled in once weights are real.

Large models are built without memory (``with torch.device("meta"):``), adapted, often sharded,
then materialised (``model.to_empty(device=...)``) and loaded. DoRA's magnitude depends on the
base weights (``m = ‖W_i‖``), so it can only be set after that load::

    with torch.device("meta"):
        model = build_model()
    apply_dora(model, config)
    model.to_empty(device="cuda")
    model.load_state_dict(adapted_state_dict(model, base_weights), strict=False)
    initialize_magnitude(model)
"""

from __future__ import annotations

from torch import Tensor, nn

from torchdora.distributed import unwrap_model
from torchdora.layers.base import DoRALayer
from torchdora.model.modules_to_save import ModulesToSaveWrapper
from torchdora.model.ops import dora_modules


def initialize_magnitude(model: nn.Module) -> nn.Module:
    """Set every DoRA layer's magnitude from the base weights now in ``model``; returns ``model``.

    Layers built on the ``meta`` device and not loaded since get a new adapter, exactly as
    :func:`~torchdora.apply_dora` gives on real weights (``A`` by ``init``, ``B = 0``,
    ``m = ‖W_i‖``). Layers whose ``A``, ``B`` hold values keep them and get ``m = ‖W + s·B A‖``
    (PEFT's DoRA initialisation), which replaces a trained magnitude: do not call this after
    loading a trained adapter. With FSDP2-sharded parameters every rank must call it.

    Raises:
        ValueError: ``model`` has no DoRA/LoRA layers.
        RuntimeError: a base weight is still on the ``meta`` device, or a layer is merged.
    """
    layers = [layer for _, layer in dora_modules(unwrap_model(model))]
    if not layers:
        raise ValueError(
            "initialize_magnitude: the model has no DoRA/LoRA layers; apply_dora first"
        )
    for layer in layers:
        layer.initialize_magnitude()
    return model


def adapted_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` of the model before :func:`~torchdora.apply_dora`, under ``model``'s keys.

    ``apply_dora`` moves an adapted module's tensors under ``base_layer.`` and a
    ``modules_to_save`` module's under ``original_module.`` and ``modules_to_save.<adapter>.``
    (all get the weights). Keys ``model`` already has, and keys of no adapted module, are kept as
    they are, so ``load_state_dict(..., strict=False)`` reports the ones that fit nowhere. The
    tensors are not copied.
    """
    model = unwrap_model(model)
    moved: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            copies = tuple(f"modules_to_save.{copy}" for copy in module.modules_to_save)
            moved[name] = ("original_module", *copies)
        elif isinstance(module, DoRALayer):
            moved[name] = ("base_layer",)
    own = set(model.state_dict())
    result: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        owner = None if key in own else _owner(key, moved)
        if owner is None:
            result[key] = value
            continue
        rest = key[len(owner) + 1 :] if owner else key
        for child in moved[owner]:
            result[".".join(filter(None, (owner, child, rest)))] = value
    return result


def _owner(key: str, modules: dict[str, tuple[str, ...]]) -> str | None:
    """The longest name in ``modules`` that ``key`` lies under, if any."""
    parts = key.split(".")
    for end in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None
