"""Whole-model ΔM/ΔD: a snapshot of the original weights, and the change of a model against it.

For a DoRA or LoRA layer the original weight is its frozen base ``W``, so the snapshot keeps
only ``‖W_i‖`` and the change is computed in factored form (:func:`factored_change`). For a
plainly fine-tuned module the snapshot keeps a copy of its weight: the direction change of a
full fine-tune cannot be had without the original rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchdora.analysis.change import (
    LayerChange,
    dense_change,
    factored_change,
    row_norms,
    weight_products,
)
from torchdora.layers.base import DoRALayer
from torchdora.layers.dispatch import layer_kind_for, supported_base_types
from torchdora.model.ops import dora_modules

#: How far (relative) a DoRA layer's base row norms may drift from the snapshot's.
BASE_NORM_RTOL = 1e-6


@dataclass(frozen=True)
class LayerReference:
    """The original weight of one layer: its row norms ``‖W⁰_i‖`` (float64, ``(d_out,)``) and,
    for a module that is not a DoRA/LoRA layer, a copy of ``W⁰`` as ``(d_out, fan_in)``."""

    row_norms: Tensor
    weight: Tensor | None = None


def weight_rows(module: nn.Module) -> Tensor:
    """The weight whose rows carry the magnitudes, as ``(d_out, fan_in)`` (a view, no copy).

    A DoRA layer's :meth:`~torchdora.DoRALayer.weight_matrix`; for a plain module what its layer
    kind says (:attr:`~torchdora.LayerKind.weight_rows`): ``nn.Linear`` as is, convolutions
    flattened per output channel, ``nn.Embedding`` and ``transformers``' ``Conv1D`` transposed.
    """
    if isinstance(module, DoRALayer):
        return module.weight_matrix()
    kind = layer_kind_for(module)
    if kind is None or not isinstance(getattr(module, "weight", None), Tensor):
        raise TypeError(
            f"{type(module).__name__} has no weight matrix to analyse (expected a DoRA/LoRA "
            f"layer or a module of a kind torchdora adapts: {', '.join(supported_base_types())})"
        )
    return kind.weight_rows(module)


@torch.no_grad()
def capture_reference(
    model: nn.Module, modules: Iterable[str] | None = None
) -> dict[str, LayerReference]:
    """Snapshot the original weights that :func:`decomposition_change` compares against.

    Args:
        model: the model before training.
        modules: full names of the modules to analyse; default every DoRA/LoRA layer. A full
            fine-tune has none, so name its trained modules (the same ones the adapter runs
            target, for comparable plots).

    Returns:
        ``{name: LayerReference}``. DoRA/LoRA layers cost ``d_out`` floats each; other
        modules a copy of their weight (same dtype and device).
    """
    if modules is None:
        selected = list(dora_modules(model))
        if not selected:
            raise ValueError(
                "the model has no DoRA/LoRA layers; for a full fine-tune pass modules=[...] "
                "with the names of the trained modules"
            )
    else:
        selected = [(name, _submodule(model, name)) for name in modules]
    reference = {}
    for name, module in selected:
        _check_not_merged(name, module)
        rows = weight_rows(module)
        copy = None if isinstance(module, DoRALayer) else rows.detach().clone()
        reference[name] = LayerReference(row_norms(rows), copy)
    return reference


@torch.no_grad()
def decomposition_change(
    model: nn.Module, reference: Mapping[str, LayerReference]
) -> dict[str, LayerChange]:
    """``{name: (ΔM, ΔD)}`` of ``model``'s layers against :func:`capture_reference`'s snapshot.

    A DoRA layer's new magnitude is its ``magnitude`` and its new direction ``V = W + s·B A``; a
    LoRA layer's are the norm and direction of ``W + s·B A``; a plain module's those of its
    current weight. Only one layer's weight is read (in float64 row blocks) at a time.
    """
    changes = {}
    for name, ref in reference.items():
        module = _submodule(model, name)
        _check_not_merged(name, module)
        if isinstance(module, DoRALayer):
            changes[name] = _adapter_change(name, module, ref)
        elif ref.weight is None:
            raise ValueError(
                f"{name!r} was a DoRA/LoRA layer when the reference was captured but is a "
                f"{type(module).__name__} now; capture the reference from this model"
            )
        else:
            current = weight_rows(module)
            changes[name] = dense_change(ref.weight.to(current.device), current)
    return changes


def state_dict_change(
    before: Mapping[str, Tensor], after: Mapping[str, Tensor], keys: Iterable[str] | None = None
) -> dict[str, LayerChange]:
    """``(ΔM, ΔD)`` between two plain state dicts (a full fine-tune), one tensor at a time.

    Rows are the tensors' first dimension (the rest flattened), which is right for
    ``nn.Linear`` and convolutions; ``transformers``' ``Conv1D`` and embedding tables are stored
    transposed, so compare models (:func:`capture_reference` with ``modules=``) for those.

    Args:
        before, after: the state dicts.
        keys: the tensors to compare; default every floating tensor of two or more dimensions
            whose key ends in ``weight`` and is in both.

    Returns:
        ``{name: (ΔM, ΔD)}`` with a key's trailing ``.weight`` removed, so the names are the
        module names that :func:`decomposition_change` reports for adapted models.
    """
    if keys is None:
        keys = [
            key
            for key, tensor in before.items()
            if key.endswith("weight")
            and key in after
            and tensor.is_floating_point()
            and tensor.dim() >= 2
        ]
    changes = {}
    for key in keys:
        missing = [name for name, sd in (("before", before), ("after", after)) if key not in sd]
        if missing:
            raise KeyError(f"{key!r} is not in the {' and '.join(missing)} state dict")
        original, trained = before[key], after[key]
        if original.shape != trained.shape:
            raise ValueError(
                f"{key!r} has shape {tuple(original.shape)} before and {tuple(trained.shape)} after"
            )
        if original.dim() < 2:
            raise ValueError(f"{key!r} is not a weight matrix: shape {tuple(original.shape)}")
        rows = original.shape[0]
        changes[key.removesuffix(".weight")] = dense_change(
            original.reshape(rows, -1), trained.reshape(rows, -1).to(original.device)
        )
    return changes


def _adapter_change(name: str, layer: DoRALayer, ref: LayerReference) -> LayerChange:
    weight_sq_norm, weight_a = weight_products(layer.weight_matrix(), layer.lora_A)
    original_norm = ref.row_norms.to(weight_sq_norm.device)
    if not torch.allclose(weight_sq_norm.sqrt(), original_norm, rtol=BASE_NORM_RTOL, atol=0.0):
        raise ValueError(
            f"the base weight of {name!r} has changed since the reference was captured; the "
            "analysis of an adapter compares W + s·B·A with its frozen base W, so it needs the "
            "base unchanged (a trained base, freeze_base=False, is not supported)"
        )
    return factored_change(
        weight_sq_norm,
        weight_a,
        layer.lora_A,
        layer.lora_B,
        layer.scaling,
        layer.magnitude,  # None for LoRA
        normalize=layer.normalize,
    )


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module named {name!r}") from None


def _check_not_merged(name: str, module: nn.Module) -> None:
    if isinstance(module, DoRALayer) and module.merged:
        raise ValueError(
            f"{name!r} is merged, so its base weight holds W' rather than W; "
            "call torchdora.unmerge_adapter(model) before analysing"
        )
