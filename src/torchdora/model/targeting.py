"""Which modules a :class:`~torchdora.DoRAConfig` selects, with errors that say why not."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from torchdora.config import ALL_LINEAR, DoRAConfig
from torchdora.layers.base import DoRALayer
from torchdora.layers.dispatch import LayerKind, layer_kind_for, supported_base_types
from torchdora.model.modules_to_save import ModulesToSaveWrapper

_Q_V_PROJ = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]
_QKV_FUSED = ["query_key_value"]

#: Default ``target_modules`` per ``transformers`` ``model_type``: the attention query and value
#: projections (fused QKV where the architecture has one), as in the DoRA and LoRA papers.
#: Vision models list both spellings their attention has used across transformers versions.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
            "opt", "gptj", "bart", "whisper", "clip",
        ],
        _Q_V_PROJ,
    ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "albert"], _QUERY_VALUE),
    **dict.fromkeys(["vit", "deit", "swin"], _Q_V_PROJ + _QUERY_VALUE),
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], _QKV_FUSED),
    "gpt2": ["c_attn"],
    "phi3": ["qkv_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mpnet": ["q", "v"],
}  # fmt: skip

#: Last name components that mark a Linear as (part of) the output head for ``"all-linear"``.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "head", "qa_outputs"})


@dataclass(frozen=True)
class Target:
    """A module to adapt: where it is, what it is, and the layer kind that adapts it
    (``None`` for a DoRA layer already there, which gets one more adapter)."""

    name: str
    module: nn.Module
    kind: LayerKind | None


def default_target_modules(model: nn.Module) -> list[str]:
    """The ``target_modules`` used when a config gives none, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    known = "" if model_type is None else f" for model_type {model_type!r}"
    raise ValueError(
        f"DoRAConfig.target_modules is not set and torchdora has no default{known}; pass "
        "target_modules, e.g. 'all-linear' or a list of module names such as "
        f"{_adaptable_leaves(candidate_modules(model))[:8]}"
    )


def name_matches(spec: list[str] | str, name: str) -> bool:
    """A list matches names equal to an entry or ending in ``"." + entry``; a string is a regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule except the model itself and the insides of DoRA
    layers and modules-to-save wrappers (those are yielded, their children are not)."""
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}{child_name}"
            yield name, child
            if not isinstance(child, DoRALayer | ModulesToSaveWrapper):
                yield from walk(name + ".", child)

    return walk("", model)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules ``"all-linear"`` leaves out as the output head.

    The module ``model.get_output_embeddings()`` returns (``transformers`` models), and every
    module whose name has a component in :data:`HEAD_NAMES` (``classifier``, ``lm_head`` …).
    """
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return {
        name
        for name, module in candidate_modules(model)
        if module is output or not HEAD_NAMES.isdisjoint(name.split("."))
    }


def find_targets(
    model: nn.Module, config: DoRAConfig, adapter_name: str = "default"
) -> list[Target]:
    """The modules ``config`` adapts with adapter ``adapter_name``, in model order (DoRA layers
    already there among them). Raises if the selection is unusable."""
    spec = config.target_modules
    if spec is None:
        spec = default_target_modules(model)
    candidates = list(candidate_modules(model))
    if config.exclude_modules is not None:
        _require_match("exclude_modules", config.exclude_modules, candidates)
        candidates = [(n, m) for n, m in candidates if not name_matches(config.exclude_modules, n)]
    if spec == ALL_LINEAR:
        return _all_linear(model, candidates, adapter_name)

    matched = [(n, m) for n, m in candidates if name_matches(spec, n)]
    if not matched:
        raise ValueError(_no_match_message("target_modules", spec, candidates))
    unsupported, targets = [], []
    for name, module in matched:
        if isinstance(module, DoRALayer):
            targets.append(_existing(name, module, adapter_name))
            continue
        kind = _kind(model, name, module)
        if kind is None:
            unsupported.append(f"{name!r} ({type(module).__name__})")
        else:
            targets.append(Target(name, module, kind))
    if unsupported:
        raise TypeError(
            f"target_modules {spec!r} matched modules torchdora cannot adapt: "
            f"{', '.join(unsupported)}. Supported: {', '.join(supported_base_types())} "
            "(an nn.Linear inside nn.MultiheadAttention is not called as a module, so it is "
            "not supported). Use more specific names or exclude_modules"
        )
    return targets


def _all_linear(
    model: nn.Module, candidates: list[tuple[str, nn.Module]], adapter_name: str
) -> list[Target]:
    heads = output_head_names(model)
    targets = []
    for name, module in candidates:
        if name in heads:
            continue
        if isinstance(module, DoRALayer):
            base_kind = layer_kind_for(module.base_layer)
            if base_kind is not None and base_kind.linear:
                targets.append(_existing(name, module, adapter_name))
            continue
        kind = _kind(model, name, module)
        if kind is not None and kind.linear:
            targets.append(Target(name, module, kind))
    if not targets:
        raise ValueError(
            "target_modules='all-linear' matched no Linear-like module outside the output head "
            f"(left out as head: {sorted(heads)})"
        )
    return targets


def _existing(name: str, layer: DoRALayer, adapter_name: str) -> Target:
    """A DoRA layer already in the model, as the target of a new adapter ``adapter_name``."""
    if adapter_name in layer.adapters:
        raise ValueError(
            f"{name!r} already has an adapter named {adapter_name!r}; apply_dora with another "
            "adapter_name adds a second adapter (or delete_adapter(model, name) first)"
        )
    return Target(name, layer, None)


def _kind(model: nn.Module, name: str, module: nn.Module) -> LayerKind | None:
    """The layer kind for ``module``; ``None`` for a Linear that nn.MultiheadAttention owns
    (it reads ``out_proj.weight`` directly, so a wrapper would never be called)."""
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        return None
    return layer_kind_for(module)


def _require_match(option: str, spec: list[str] | str, candidates) -> None:
    if not any(name_matches(spec, name) for name, _ in candidates):
        raise ValueError(_no_match_message(option, spec, candidates))


def _adaptable_leaves(candidates) -> list[str]:
    """Sorted last name components of the candidates torchdora could adapt."""
    return sorted({n.rpartition(".")[2] for n, m in candidates if layer_kind_for(m) is not None})


def _no_match_message(option: str, spec: list[str] | str, candidates) -> str:
    leaves = _adaptable_leaves(candidates)
    requested = [spec] if isinstance(spec, str) else spec
    close = sorted(
        {
            c
            for entry in requested
            for c in difflib.get_close_matches(entry, leaves, n=3, cutoff=0.5)
        }
    )
    hint = f" Did you mean {close}?" if close else ""
    if isinstance(spec, str) and spec in leaves:
        hint = (
            f" A string is a regular expression matched against the full module name; "
            f"to select modules by name pass a list: [{spec!r}]."
        )
    shown = leaves[:20] + (["…"] if len(leaves) > 20 else [])
    return (
        f"{option} {spec!r} matches no module of the model.{hint} Names of modules torchdora "
        f"can adapt: {shown}"
    )
