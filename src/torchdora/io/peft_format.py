"""Translation between a torchdora model and Hugging Face PEFT's adapter format.

PEFT (``peft_type="LORA"``, ``use_dora=true``) stores, for the module at path ``p``:

* ``base_model.model.<p>.lora_A.weight`` (r × in), ``….lora_B.weight`` (out × r) — for an
  Embedding ``….lora_embedding_A`` (r × num_embeddings) and ``….lora_embedding_B``
  (embedding_dim × r), without ``.weight``; for a convolution the conv-shaped kernels
  ``(r, in, *k)`` and ``(out, r, 1, …)``;
* ``base_model.model.<p>.lora_magnitude_vector``: ``(out,)``, ``(embedding_dim,)``, or
  ``(1, out, 1, …)`` for a convolution;
* trained biases under their parameter names (``<p>.base_layer.bias`` for adapted layers),
  and each ``modules_to_save`` module's own state dict under ``<p>.``.

torchdora's module paths and ``base_layer`` naming coincide with PEFT's, so the mapping is
per-tensor reshaping only; each layer kind declares its keys and shapes
(:meth:`~torchdora.DoRALayer.peft_layout`). One file holds one adapter: a model's other
adapters go to files of their own (PEFT's multi-adapter folders, see :mod:`torchdora.io.adapter`).
The config half of the format is :mod:`torchdora.io.peft_config`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdora.distributed import copy_full_, full_tensor
from torchdora.io.files import AdapterFileError
from torchdora.layers.base import DoRALayer, PeftTensor
from torchdora.model import ModulesToSaveWrapper, active_adapter, dora_modules

PREFIX = "base_model.model."
# PEFT key suffix -> our parameter name
_SUFFIXES = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
    "lora_magnitude_vector": "magnitude",
}
_RANK_AXIS = {"lora_A": 0, "lora_B": 1}  # in PEFT's shapes (peft_layout)


def layout(layer: DoRALayer, adapter_name: str) -> dict[str, PeftTensor]:
    """:meth:`~torchdora.DoRALayer.peft_layout` of one adapter, refusals as file errors."""
    try:
        return layer.peft_layout(adapter_name)
    except ValueError as err:
        raise AdapterFileError(str(err)) from None


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, DoRALayer]:
    """The DoRA layers of ``model`` that hold adapter ``adapter_name``, by module name."""
    return {name: layer for name, layer in dora_modules(model) if adapter_name in layer.adapters}


def wrappers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Module name → adapter ``adapter_name``'s trained copy, of every modules-to-save wrapper
    that has one."""
    return {
        name: module.modules_to_save[adapter_name]
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    }


def trained_extras(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters that are neither adapter factors nor in a modules-to-save wrapper:
    the biases ``DoRAConfig.bias`` unfroze (an adapted layer's as ``<p>.base_layer.bias``)."""
    factor_ids = {
        id(param)
        for _, layer in dora_modules(model)
        for adapter in layer.adapters.values()
        for param in adapter.named_factors().values()
    }
    wrapped = tuple(
        f"{name}." for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
    )
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in factor_ids and not name.startswith(wrapped)
    }


def peft_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """Every tensor of adapter ``adapter_name`` (default: the active one) under PEFT's key, in
    PEFT's shape, whole.

    Sharded (FSDP2) tensors are gathered, so every rank must call this together.
    """
    adapter_name = adapter_name or active_adapter(model)
    tensors: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model, adapter_name).items():
        adapter = layer.get_adapter(adapter_name)
        for param, where in layout(layer, adapter_name).items():
            tensors[f"{PREFIX}{name}.{where.suffix}"] = (
                full_tensor(getattr(adapter, param)).detach().reshape(where.shape)
            )
    for name, param in trained_extras(model).items():
        tensors[PREFIX + name] = full_tensor(param).detach()
    for name, copy in wrappers(model, adapter_name).items():
        for key, tensor in copy.state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = full_tensor(tensor)
    return tensors


def adapter_ranks(tensors: dict[str, Tensor]) -> dict[str, int]:
    """Module → rank of its ``lora_A`` (else ``lora_B``) in a PEFT-keyed state dict.

    Whether the two agree is left to the shape checks of :func:`load_peft_state_dict`.
    """
    ranks: dict[str, int] = {}
    magnitudes = {}
    for key, tensor in tensors.items():
        parsed = split_peft_key(key)
        if parsed is None:
            continue
        path, param = parsed
        if param == "magnitude":
            magnitudes[path] = key
            continue
        if tensor.dim() < 2:
            raise AdapterFileError(
                f"{key} has shape {tuple(tensor.shape)}; a LoRA factor has at least 2 dimensions"
            )
        if param == "lora_A":  # (r, in, …); lora_B (out, r, …) only counts without an A
            ranks[path] = tensor.shape[0]
        else:
            ranks.setdefault(path, tensor.shape[1])
    orphans = sorted(key for path, key in magnitudes.items() if path not in ranks)
    if orphans:
        raise AdapterFileError(f"the adapter has magnitudes without lora_A/lora_B: {orphans[:5]}")
    return ranks


def split_peft_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<path>.<suffix>`` → ``(path, our parameter name)`` for adapter
    factors, else ``None``."""
    if not key.startswith(PREFIX):
        return None
    for suffix, param in _SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], param
    return None


def _shape_difference(param: str, expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    """What differs between the shape a ``param`` tensor needs and the one found."""
    other_sizes = "the adapter was trained on a model with other layer sizes"
    axis = _RANK_AXIS.get(param)
    if axis is None or len(found) != len(expected) or found[axis] == expected[axis]:
        return other_sizes
    same_sizes = all(
        f == e for i, (f, e) in enumerate(zip(found, expected, strict=True)) if i != axis
    )
    return "rank mismatch" if same_sizes else f"rank mismatch, and {other_sizes}"


def load_peft_state_dict(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str) -> None:
    """Copy PEFT-keyed ``tensors`` into adapter ``adapter_name``; every key must find its place.

    Raises :class:`AdapterFileError` naming unknown keys, missing tensors, wrong shapes, or
    non-finite values. Values are cast to each parameter's dtype (the magnitude stays float32).
    A sharded (FSDP2) parameter takes its own shard of the whole tensor given.
    """
    layers = adapter_layers(model, adapter_name)
    targets: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (parameter, value)
    unknown = []
    for key, value in tensors.items():
        parsed = split_peft_key(key)
        if parsed is not None and parsed[0] in layers:
            path, param = parsed
            where = layout(layers[path], adapter_name).get(param)
            if where is None:
                unknown.append(key)
                continue
            if tuple(value.shape) != where.shape:
                raise AdapterFileError(
                    f"{key}: expected shape {where.shape}, found {tuple(value.shape)} "
                    f"({_shape_difference(param, where.shape, tuple(value.shape))})"
                )
            targets[key] = (getattr(layers[path].get_adapter(adapter_name), param), value)
        else:
            unknown.append(key)
    named = _named_saved_tensors(model, adapter_name)
    still_unknown = []
    for key in unknown:
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        if name in named:
            param = named[name]
            if tuple(value_shape := tensors[key].shape) != tuple(param.shape):
                raise AdapterFileError(
                    f"{key}: expected shape {tuple(param.shape)}, found {tuple(value_shape)}"
                )
            targets[key] = (param, tensors[key])
        else:
            still_unknown.append(key)
    if still_unknown:
        raise not_in_model(still_unknown)
    expected = {
        f"{PREFIX}{path}.{where.suffix}"
        for path, layer in layers.items()
        for where in layout(layer, adapter_name).values()
    }
    missing = sorted(expected - set(targets))
    if missing:
        raise AdapterFileError(
            f"the adapter file lacks tensors the model's adapters need: {missing[:10]}"
        )
    targets = {
        key: (param, _loadable(key, value, param)) for key, (param, value) in targets.items()
    }
    for param, value in targets.values():
        copy_full_(param, value.reshape(param.shape))
    for layer in layers.values():
        layer.mark_initialized(adapter_name)


def not_in_model(names: list[str]) -> AdapterFileError:
    listed = sorted(names)
    more = f" and {len(listed) - 10} more" if len(listed) > 10 else ""
    return AdapterFileError(
        f"the adapter has tensors for modules this model does not have: {listed[:10]}{more}"
    )


def _loadable(key: str, value: Tensor, param: Tensor) -> Tensor:
    """``value`` cast to ``param``'s dtype, refused if of another kind or not finite there."""
    if value.is_complex() or value.is_floating_point() != param.is_floating_point():
        raise AdapterFileError(
            f"{key} holds {value.dtype} values; the model's tensor is {param.dtype}"
        )
    cast = value.to(param.dtype)
    if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
        overflow = value.dtype != cast.dtype and bool(torch.isfinite(value.double()).all())
        problem = f"values too large for {param.dtype}" if overflow else "NaN or Inf values"
        raise AdapterFileError(f"{key} holds {problem}; refusing to load it")
    return cast


def _named_saved_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """Non-factor tensors an adapter file may carry, by name: any model parameter (trained
    biases; PEFT's ``save_embedding_layers`` base weights) and the adapter's modules-to-save
    copies (named as PEFT names them, without ``modules_to_save.<adapter>``)."""
    named: dict[str, Tensor] = dict(model.named_parameters())
    for name, copy in wrappers(model, adapter_name).items():
        for key, tensor in copy.state_dict(keep_vars=True).items():
            named[f"{name}.{key}"] = tensor
            # PEFT with bias="all" also writes each copy's bias under this name.
            named[f"{name}.modules_to_save.{key}"] = tensor
    return named
