"""``adapter_config.json``: the config half of PEFT's adapter format, both ways.

:func:`peft_config` describes one adapter of a model as PEFT's ``LoraConfig`` would;
:func:`dora_config_from_peft` reads one back into the :class:`~torchdora.DoRAConfig` that
recreates its layers. The tensors are :mod:`torchdora.io.peft_format`'s.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from torchdora.config import DoRAConfig, pattern_matches
from torchdora.io.files import AdapterFileError
from torchdora.io.peft_format import PREFIX, adapter_layers, not_in_model, trained_extras, wrappers
from torchdora.layers.adapter import DoRAAdapter
from torchdora.model.targeting import candidate_modules, name_matches

_BIAS_MODES = {"none": "none", "all": "all", "dora_only": "lora_only"}
NO_NORM_PEFT_TYPE = "TORCHDORA_DORA_NO_NORM"
"""The ``peft_type`` of a no-norm adapter (``normalize=False``): PEFT cannot compute it and
refuses the type, so it never loads as ordinary DoRA with other outputs; torchdora reads it."""


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def _shared_setting(
    adapters: dict[str, DoRAAdapter], key: str, value_of: Callable[[DoRAAdapter], object]
) -> object:
    """The one value of ``key`` all ``adapters`` share: PEFT's format holds one per adapter."""
    values = {value_of(adapter) for adapter in adapters.values()}
    if len(values) > 1:
        raise ValueError(
            f"PEFT's format holds one {key} for all layers of an adapter; these layers mix "
            f"{sorted(values)}"
        )
    return values.pop()


def peft_config(
    model: nn.Module, adapter_name: str, base_model_name_or_path: str | None = None
) -> dict:
    """``adapter_config.json`` contents describing adapter ``adapter_name`` as it is in ``model``.

    Targets are the adapted modules' full names; ranks and alphas that differ from the most
    common one go to ``rank_pattern``/``alpha_pattern`` under their escaped full names.
    """
    layers = adapter_layers(model, adapter_name)
    if not layers:
        raise ValueError("the model has no DoRA/LoRA layers to save; call apply_dora first")
    adapters = {name: layer.get_adapter(adapter_name) for name, layer in layers.items()}
    ranks = {name: adapter.rank for name, adapter in adapters.items()}
    alphas = {name: adapter.alpha for name, adapter in adapters.items()}
    rank, alpha = _most_common(ranks), _most_common(alphas)
    extras = trained_extras(model)
    normalize = _shared_setting(adapters, "normalize", lambda a: a.normalize)
    adapted_biases = {f"{name}.base_layer.bias" for name in layers}
    bias = "none" if not extras else "dora_only" if set(extras) <= adapted_biases else "all"
    if base_model_name_or_path is None:
        base_model_name_or_path = (
            getattr(getattr(model, "config", None), "_name_or_path", None) or None
        )
    return {
        "peft_type": "LORA" if normalize else NO_NORM_PEFT_TYPE,
        "use_dora": _shared_setting(adapters, "use_dora", lambda adapter: adapter.use_dora),
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "target_modules": sorted(layers),
        "lora_dropout": _shared_setting(adapters, "lora_dropout", lambda a: a.dropout),
        "use_rslora": _shared_setting(adapters, "use_rslora", lambda a: a.use_rslora),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": _BIAS_MODES[bias],
        "modules_to_save": sorted(wrappers(model, adapter_name)) or None,
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
    if config.get("peft_type") not in ("LORA", NO_NORM_PEFT_TYPE):
        raise AdapterFileError(
            f"adapter_config.json: peft_type is {config.get('peft_type')!r}; torchdora loads "
            f"LoRA/DoRA adapters (peft_type 'LORA', or {NO_NORM_PEFT_TYPE!r} for DoRA without "
            "normalisation)"
        )
    normalize = config["peft_type"] == "LORA"
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
            normalize=normalize,
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
        raise not_in_model(absent)
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
