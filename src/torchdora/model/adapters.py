"""Several named adapters on one model: list them, pick the active one, delete one.

One adapter is active at a time, as in PEFT's ``set_adapter``: it alone computes and trains.
Several DoRA adapters active at once would have no single meaning (the norm of which sum of
updates?), so this module never makes more than one active; ``mixed_batch`` runs different
adapters on different rows instead, and ``combine_adapters`` builds one adapter from several.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from torchdora.layers.adapter import check_adapter_name
from torchdora.layers.base import DoRALayer
from torchdora.model.modules_to_save import ModulesToSaveWrapper

AdapterHolder = DoRALayer | ModulesToSaveWrapper


def adapter_holders(model: nn.Module) -> Iterator[tuple[str, AdapterHolder]]:
    """``(name, module)`` of every DoRA layer and modules-to-save wrapper, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterHolder):
            yield name, module


def _names_of(module: AdapterHolder) -> list[str]:
    return list(module.adapters if isinstance(module, DoRALayer) else module.modules_to_save)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in ``model``, in the order they were added (``[]`` if none)."""
    names: dict[str, None] = {}
    for _, module in adapter_holders(model):
        names.update(dict.fromkeys(_names_of(module)))
    return list(names)


def active_adapter(model: nn.Module) -> str:
    """The name of ``model``'s active adapter (see :func:`set_adapter`)."""
    active = {module.active_adapter for _, module in adapter_holders(model)}
    if not active:
        raise ValueError("the model has no torchdora adapters; apply_dora first")
    if len(active) > 1:  # only by setting layer.active_adapter by hand
        raise RuntimeError(
            f"the model's layers have different active adapters {sorted(active)}; call "
            "set_adapter(model, name) to pick one"
        )
    return active.pop()


def check_known(model: nn.Module, name: object, what: str = "adapter") -> str:
    """``name`` if ``model`` has an adapter of that name, else an error listing the known ones."""
    if isinstance(name, list | tuple | set):
        raise TypeError(
            f"one {what} at a time, got {name!r}: several active DoRA adapters have no single "
            "meaning (the norm of which sum?). Use mixed_batch to run different adapters on "
            "different rows, or combine_adapters to build one adapter from several"
        )
    check_adapter_name(name)
    known = adapter_names(model)
    if name not in known:
        raise KeyError(f"the model has no adapter named {name!r}; its adapters: {known}")
    return name


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one: it alone computes and its parameters train; every
    other adapter is frozen (PEFT's behaviour). Returns ``model``.

    What an adapter trained when it was frozen trains again when it is activated (a frozen
    magnitude stays frozen). Layers without an adapter ``name`` compute their base module.
    Refused while an adapter is merged (unmerge first) or for several names at once.
    """
    check_known(model, name)
    merged = [n for n, m in adapter_holders(model) if isinstance(m, DoRALayer) and m.merged]
    if merged:
        raise RuntimeError(
            f"set_adapter: adapters are merged into {merged[:3]}; unmerge_adapter(model) first"
        )
    for _, module in adapter_holders(model):
        module.active_adapter = name
        if isinstance(module, DoRALayer):
            for adapter_name, adapter in module.adapters.items():
                adapter.unfreeze() if adapter_name == name else adapter.freeze()
        else:
            for adapter_name, copy in module.modules_to_save.items():
                copy.requires_grad_(adapter_name == name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer, in place; returns ``model``.

    A layer (or modules-to-save wrapper) left without adapters is replaced by its base module.
    Deleting the active adapter makes the first remaining one active. The last adapter of a
    model cannot be deleted: merge it (``merge_and_unload``) or reload the base model.
    """
    check_known(model, name)
    remaining = [n for n in adapter_names(model) if n != name]
    if not remaining:
        raise ValueError(
            f"{name!r} is the model's only adapter; deleting it would leave no adapter. Use "
            "merge_and_unload(model) to keep it in the weights, or reload the base model"
        )
    was_active = active_adapter(model) == name
    drop_adapter(model, name)
    if was_active:
        set_adapter(model, remaining[0])
    return model


def drop_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every module that holds it, replacing a module left without
    adapters by its base module (what :func:`delete_adapter` does, without its checks)."""
    for module_name, module in list(adapter_holders(model)):
        if name not in _names_of(module):
            continue
        module.delete_adapter(name)
        if not _names_of(module):
            base = module.base_layer if isinstance(module, DoRALayer) else module.original_module
            model.set_submodule(module_name, base)


@contextmanager
def attribute_set(modules: Sequence[nn.Module], attribute: str, value: Any) -> Iterator[None]:
    """Set ``attribute`` on every module for the block; restore each one's own value after."""
    previous = [getattr(module, attribute) for module in modules]
    for module in modules:
        setattr(module, attribute, value)
    try:
        yield
    finally:
        for module, state in zip(modules, previous, strict=True):
            setattr(module, attribute, state)
