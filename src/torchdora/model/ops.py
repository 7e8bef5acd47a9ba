"""Model-level adapter operations: iterate, merge, unmerge, unload, disable, count."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from torchdora.layers.base import DoRALayer
from torchdora.model.adapters import active_adapter, attribute_set, check_known
from torchdora.model.modules_to_save import ModulesToSaveWrapper
from torchdora.quantization import num_weights


def dora_modules(model: nn.Module) -> Iterator[tuple[str, DoRALayer]]:
    """``(name, layer)`` for every DoRA (or LoRA) layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, DoRALayer):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Write adapter ``adapter_name`` (default: the active one) into every base weight it adapts
    (reversible with :func:`unmerge_adapter`). One adapter is merged at a time.

    Raises ``ValueError`` if an adapted weight is tied to another module's (tied
    embeddings): merging would change that module too.
    """
    _check_not_tied(model)
    for _, layer in _layers_with(model, adapter_name):
        layer.merge(adapter_name)


def unmerge_adapter(model: nn.Module) -> None:
    """Restore every base weight (to rounding) after :func:`merge_adapter`."""
    for _, layer in dora_modules(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Merge one adapter and put the plain base modules back, in place; returns ``model``.

    The adapter merged is ``adapter_name``, by default the active one; every other adapter is
    dropped. Afterwards the model holds no torchdora modules: each DoRA layer is replaced by
    what its ``merge_and_unload()`` returns (its base module carrying ``W'``; a new float
    ``nn.Linear`` for a quantized base; the plain base module where the adapter is absent),
    each modules-to-save wrapper by that adapter's trained copy (or its original module).
    Outputs equal the adapted model's with that adapter active, to rounding. Parameters keep
    their ``requires_grad`` flags.
    """
    _check_not_tied(model)
    name = _adapter_name(model, adapter_name)
    replacements = []
    for module_name, module in list(dora_modules(model)):
        if name in module.adapters:
            replacements.append((module_name, module.merge_and_unload(name)))
        else:
            module.unmerge()
            replacements.append((module_name, module.base_layer))
    for module_name, wrapper in _wrappers(model):
        copies = dict(wrapper.modules_to_save)
        replacements.append((module_name, copies.get(name, wrapper.original_module)))
    for module_name, module in replacements:
        model.set_submodule(module_name, module)
    return model


def _adapter_name(model: nn.Module, adapter_name: str | None) -> str | None:
    """``adapter_name``, checked, or the active adapter's name (``None`` without adapters)."""
    if adapter_name is not None:
        return check_known(model, adapter_name)
    return active_adapter(model) if any(True for _ in dora_modules(model)) else None


def _layers_with(model: nn.Module, adapter_name: str | None) -> list[tuple[str, DoRALayer]]:
    name = _adapter_name(model, adapter_name)
    return [(n, layer) for n, layer in dora_modules(model) if name in layer.adapters]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with`` block ``model`` computes exactly as the base model did.

    Every DoRA layer runs its base layer alone and every modules-to-save wrapper its original
    module. Biases trained with ``bias="all"``/``"dora_only"`` are part of the base modules and
    stay as trained. Raises ``RuntimeError`` if adapters are merged (unmerge them first).
    """
    modules = [m for _, m in dora_modules(model)] + [m for _, m in _wrappers(model)]
    if not modules:
        raise ValueError("disable_adapter: the model has no torchdora adapters")
    merged = [n for n, m in dora_modules(model) if m.merged]
    if merged:
        raise RuntimeError(
            f"disable_adapter: adapters are merged into their base weights ({merged[:3]} …); "
            "call unmerge_adapter(model) first"
        )
    with attribute_set(modules, "disabled", True):
        yield model


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` weights of ``model`` (shared parameters counted once).

    A quantized weight counts the weights it stands for, not the elements of its packed storage.
    """
    params = list(model.parameters())
    return sum(num_weights(p) for p in params if p.requires_grad), sum(map(num_weights, params))


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's format)."""
    trainable, total = count_trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )


def _check_not_tied(model: nn.Module) -> None:
    owners: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    for name, layer in dora_modules(model):
        if layer.merged:
            continue
        others = [n for n in owners[id(layer.weight)] if not n.startswith(name + ".")]
        if others:
            raise ValueError(
                f"cannot merge {name!r}: its base weight is tied to {others} (tied embeddings?), "
                "so merging would change those modules too. Keep this adapter unmerged, or untie "
                "the weights (give one module its own copy) before apply_dora"
            )
