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
per-tensor reshaping only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from torchdora.config import DoRAConfig, pattern_matches
from torchdora.distributed import copy_full_, full_tensor
from torchdora.io.files import AdapterFileError
from torchdora.layers.base import DoRALayer
from torchdora.layers.conv import DoRAConv
from torchdora.layers.conv1d import DoRAConv1D
from torchdora.layers.embedding import DoRAEmbedding
from torchdora.model import ModulesToSaveWrapper, dora_modules
from torchdora.model.targeting import candidate_modules, name_matches

PREFIX = "base_model.model."
# PEFT key suffix -> our parameter name
_SUFFIXES = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
    "lora_magnitude_vector": "magnitude",
}
_FACTORS = ("lora_A", "lora_B", "magnitude")  # a LoRA layer's magnitude is None
_RANK_AXIS = {"lora_A": 0, "lora_B": 1}  # in PEFT's shapes (peft_layout)
_BIAS_MODES = {"none": "none", "all": "all", "dora_only": "lora_only"}


@dataclass(frozen=True)
class PeftTensor:
    """Where one adapter parameter lives in PEFT's file: key suffix and shape."""

    suffix: str
    shape: tuple[int, ...]


def peft_layout(layer: DoRALayer) -> dict[str, PeftTensor]:
    """Our parameter name → its PEFT key suffix and shape, for one adapted layer."""
    a, b = (
        ("lora_embedding_A", "lora_embedding_B")
        if isinstance(layer, DoRAEmbedding)
        else ("lora_A.weight", "lora_B.weight")
    )
    r, out = layer.rank, layer.out_features
    shapes = {"lora_A": (r, layer.in_features), "lora_B": (out, r), "magnitude": (out,)}
    if isinstance(layer, DoRAConv):
        kernel = layer.base_weight.shape
        if layer.base_layer.groups > 1:
            raise AdapterFileError(
                "a convolution with groups > 1 cannot be written in PEFT's format: PEFT factors "
                "grouped-conv LoRA differently (full-width A, grouped B)"
            )
        ones = (1,) * (len(kernel) - 2)
        shapes = {
            "lora_A": (r, *kernel[1:]),
            "lora_B": (out, r, *ones),
            "magnitude": (1, out, *ones),
        }
    layout = {"lora_A": PeftTensor(a, shapes["lora_A"]), "lora_B": PeftTensor(b, shapes["lora_B"])}
    if layer.use_dora:
        layout["magnitude"] = PeftTensor("lora_magnitude_vector", shapes["magnitude"])
    return layout


def _wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _trained_extras(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters that are neither adapter factors nor in a modules-to-save copy:
    the biases ``DoRAConfig.bias`` unfroze (an adapted layer's as ``<p>.base_layer.bias``)."""
    factor_ids = {
        id(getattr(layer, param)) for _, layer in dora_modules(model) for param in _FACTORS
    }
    wrapped = tuple(f"{name}." for name in _wrappers(model))
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in factor_ids and not name.startswith(wrapped)
    }


def peft_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of the adapter under PEFT's key, in PEFT's shape, whole.

    Sharded (FSDP2) tensors are gathered, so every rank must call this together.
    """
    tensors: dict[str, Tensor] = {}
    for name, layer in dora_modules(model):
        for param, where in peft_layout(layer).items():
            tensors[f"{PREFIX}{name}.{where.suffix}"] = (
                full_tensor(getattr(layer, param)).detach().reshape(where.shape)
            )
    for name, param in _trained_extras(model).items():
        tensors[PREFIX + name] = full_tensor(param).detach()
    for name, wrapper in _wrappers(model).items():
        for key, tensor in wrapper.module_to_save.state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = full_tensor(tensor)
    return tensors


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def _shared_setting(
    layers: dict[str, DoRALayer], key: str, value_of: Callable[[DoRALayer], object]
) -> object:
    """The one value of ``key`` all ``layers`` share: PEFT's format holds one per adapter."""
    values = {value_of(layer) for layer in layers.values()}
    if len(values) > 1:
        raise ValueError(
            f"PEFT's format holds one {key} for all layers of an adapter; these layers mix "
            f"{sorted(values)}"
        )
    return values.pop()


def peft_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """``adapter_config.json`` contents describing the adapters actually in ``model``.

    Targets are the adapted modules' full names; ranks and alphas that differ from the most
    common one go to ``rank_pattern``/``alpha_pattern`` under their escaped full names.
    """
    layers = dict(dora_modules(model))
    if not layers:
        raise ValueError("the model has no DoRA/LoRA layers to save; call apply_dora first")
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    rank, alpha = _most_common(ranks), _most_common(alphas)
    extras = _trained_extras(model)
    adapted_biases = {f"{name}.base_layer.bias" for name in layers}
    bias = "none" if not extras else "dora_only" if set(extras) <= adapted_biases else "all"
    if base_model_name_or_path is None:
        base_model_name_or_path = (
            getattr(getattr(model, "config", None), "_name_or_path", None) or None
        )
    return {
        "peft_type": "LORA",
        "use_dora": _shared_setting(layers, "use_dora", lambda layer: layer.use_dora),
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "target_modules": sorted(layers),
        "lora_dropout": _shared_setting(
            layers, "lora_dropout", lambda layer: getattr(layer.lora_dropout, "p", 0.0)
        ),
        "use_rslora": _shared_setting(layers, "use_rslora", lambda layer: layer.use_rslora),
        "fan_in_fan_out": any(isinstance(layer, DoRAConv1D) for layer in layers.values()),
        "bias": _BIAS_MODES[bias],
        "modules_to_save": sorted(_wrappers(model)) or None,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
        "inference_mode": True,
    }


def config_value(config: dict, key: str, kinds: type | tuple[type, ...], default=None):
    """``config[key]`` (``default`` if absent), which must be of ``kinds`` or ``None``."""
    value = config.get(key, default)
    bool_for_number = isinstance(value, bool) and kinds is not bool
    if value is not None and (bool_for_number or not isinstance(value, kinds)):
        names = (
            kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        )
        raise AdapterFileError(f"adapter_config.json: {key!r} must be {names}, got {value!r}")
    return value


_UNSUPPORTED_PEFT_OPTIONS = {
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA's pooled input",
    "alora_invocation_tokens": "activated LoRA (adapters switched on by invocation tokens)",
    "layer_replication": "layers replicated in the base model",
    "target_parameters": "adapters on bare nn.Parameters",
    "trainable_token_indices": "trainable token embeddings",
}
"""PEFT options that change what a LoRA adapter computes, which torchdora does not implement:
an adapter file that sets one is refused rather than loaded as something else."""


def dora_config_from_peft(config: dict, ranks: dict[str, int]) -> DoRAConfig:
    """The :class:`DoRAConfig` that recreates a PEFT adapter's layers on the modules of
    ``ranks`` (module → rank of its tensors, see :func:`adapter_ranks`).

    Targets come from the tensors actually in the file (robust to PEFT's other targeting
    options); ranks, alphas and the rest from the config. The config's rank of each module must
    be the rank of its tensors, so a damaged config cannot make the layers larger than the file.
    As PEFT does, ``rank_pattern``/``alpha_pattern`` keys that select none of those modules
    are ignored. See :func:`fit_to_model` for the model's side.
    """
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"adapter_config.json: peft_type is {config.get('peft_type')!r}; torchdora loads "
            "LoRA/DoRA adapters (peft_type 'LORA')"
        )
    for option, what in _UNSUPPORTED_PEFT_OPTIONS.items():
        if config.get(option):
            raise AdapterFileError(
                f"adapter_config.json sets {option}={config[option]!r} ({what}), a PEFT "
                "feature torchdora does not implement"
            )
    rank = config_value(config, "r", int, 8)
    alpha = config_value(config, "lora_alpha", (int, float), rank)
    bias = config_value(config, "bias", str, "none")
    modes = {v: k for k, v in _BIAS_MODES.items()}
    if bias not in modes:
        raise AdapterFileError(
            f"adapter_config.json: bias must be one of {sorted(modes)}, got {bias!r}"
        )
    try:
        dora_config = DoRAConfig(
            rank=rank,
            alpha=float(alpha),
            dropout=float(config_value(config, "lora_dropout", (int, float), 0.0)),
            target_modules="|".join(re.escape(name) for name in ranks),
            use_dora=bool(config_value(config, "use_dora", bool, False)),
            use_rslora=bool(config_value(config, "use_rslora", bool, False)),
            rank_pattern=dict(config_value(config, "rank_pattern", dict, {})),
            alpha_pattern=dict(config_value(config, "alpha_pattern", dict, {})),
            modules_to_save=config_value(config, "modules_to_save", list) or None,
            bias=modes[bias],
        )
        dora_config = replace(
            dora_config,
            rank_pattern=_patterns_in_use(dora_config.rank_pattern, ranks),
            alpha_pattern=_patterns_in_use(dora_config.alpha_pattern, ranks),
        )
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"adapter_config.json describes an unusable adapter: {err}") from err
    wrong = [
        f"{name}: r={dora_config.rank_for(name)} in the config, {rank} in the tensors"
        for name, rank in ranks.items()
        if dora_config.rank_for(name) != rank
    ]
    if wrong:
        raise AdapterFileError(
            f"adapter_config.json does not match the tensors' ranks: {wrong[:5]}"
        )
    return dora_config


def fit_to_model(config: DoRAConfig, ranks: dict[str, int], model: nn.Module) -> DoRAConfig:
    """``config`` (:func:`dora_config_from_peft` of ``ranks``) for ``model``: every adapted
    module must be in it, and ``modules_to_save`` entries that match none of its modules are
    dropped, as PEFT drops them (it lists ``"score"`` beside ``"classifier"`` for every
    sequence classifier)."""
    modules = dict(model.named_modules())
    absent = [f"{PREFIX}{name}" for name in ranks if name not in modules]
    if absent:  # before a target pattern made of these names is built and fails to match
        raise _not_in_model(absent)
    names = [name for name, _ in candidate_modules(model)]
    kept = [
        entry
        for entry in config.modules_to_save or []
        if any(name_matches([entry], name) for name in names)
    ]
    return replace(config, modules_to_save=kept or None)


def _patterns_in_use(patterns: dict, modules: dict[str, int]) -> dict:
    """``patterns`` without those that select none of ``modules``."""
    return {
        pattern: value
        for pattern, value in patterns.items()
        if any(pattern_matches(pattern, name) for name in modules)
    }


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


def load_peft_state_dict(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy PEFT-keyed ``tensors`` into ``model``'s adapters; every key must find its place.

    Raises :class:`AdapterFileError` naming unknown keys, missing tensors, wrong shapes, or
    non-finite values. Values are cast to each parameter's dtype (the magnitude stays float32).
    A sharded (FSDP2) parameter takes its own shard of the whole tensor given.
    """
    layers = dict(dora_modules(model))
    targets: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (parameter, value)
    unknown = []
    for key, value in tensors.items():
        parsed = split_peft_key(key)
        if parsed is not None and parsed[0] in layers:
            path, param = parsed
            where = peft_layout(layers[path]).get(param)
            if where is None:
                unknown.append(key)
                continue
            if tuple(value.shape) != where.shape:
                raise AdapterFileError(
                    f"{key}: expected shape {where.shape}, found {tuple(value.shape)} "
                    f"({_shape_difference(param, where.shape, tuple(value.shape))})"
                )
            targets[key] = (getattr(layers[path], param), value)
        else:
            unknown.append(key)
    named = _named_saved_tensors(model)
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
        raise _not_in_model(still_unknown)
    expected = {
        f"{PREFIX}{path}.{where.suffix}"
        for path, layer in layers.items()
        for where in peft_layout(layer).values()
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
        layer.mark_initialized()


def _not_in_model(names: list[str]) -> AdapterFileError:
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


def _named_saved_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Non-factor tensors an adapter file may carry, by name: any model parameter (trained
    biases; PEFT's ``save_embedding_layers`` base weights) and the modules-to-save copies
    (named as PEFT names them, without ``module_to_save``)."""
    named: dict[str, Tensor] = dict(model.named_parameters())
    for name, wrapper in _wrappers(model).items():
        for key, tensor in wrapper.module_to_save.state_dict(keep_vars=True).items():
            named[f"{name}.{key}"] = tensor
            # PEFT with bias="all" also writes each copy's bias under this name.
            named[f"{name}.modules_to_save.{key}"] = tensor
    return named
