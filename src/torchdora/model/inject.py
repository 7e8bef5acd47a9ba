"""``apply_dora``: put DoRA layers into a model in place and freeze everything else."""

from __future__ import annotations

import logging
import warnings

from torch import nn

from torchdora.config import DoRAConfig, pattern_matches
from torchdora.distributed import has_sharded_parameters
from torchdora.layers.adapter import check_adapter_name
from torchdora.layers.base import DoRALayer
from torchdora.model.adapters import active_adapter, adapter_names
from torchdora.model.modules_to_save import ModulesToSaveWrapper
from torchdora.model.ops import dora_modules
from torchdora.model.targeting import (
    Target,
    candidate_modules,
    default_target_modules,
    find_targets,
    name_matches,
)

logger = logging.getLogger("torchdora")


def apply_dora(
    model: nn.Module, config: DoRAConfig | None = None, adapter_name: str = "default"
) -> nn.Module:
    """Adapt ``model`` with DoRA **in place** and return it (the same object, for chaining).

    Every module ``config`` selects is replaced by its DoRA layer (which keeps the original
    module as ``base_layer``, uncopied); every parameter of the model is then frozen except
    the adapters' ``lora_A``, ``lora_B``, ``magnitude`` (unless ``magnitude_trainable=False``),
    the biases ``config.bias`` asks for, and ``config.modules_to_save``. The adapted model's
    outputs equal the original's until the adapters are trained.

    Called again with a new ``adapter_name`` on an adapted model, it adds a second adapter with
    its own settings and targets, to layers already adapted and to newly targeted ones. As with
    PEFT's ``add_adapter``, the new adapter is not active and is frozen: ``set_adapter(model,
    adapter_name)`` makes it compute and train. Called again with a name the model has, it
    extends that adapter to more modules (none of which may have it already).

    Args:
        model: any ``nn.Module``; ``transformers`` models get per-architecture default targets.
        config: what to adapt and how; ``None`` means ``DoRAConfig()``.
        adapter_name: the adapter's name (PEFT's ``"default"``); it becomes a folder name in
            saved multi-adapter folders, so letters, digits, ``_`` and ``-`` only.

    Returns:
        ``model``.

    Raises:
        ValueError: nothing matches ``target_modules`` (close names are listed), a
            ``rank_pattern``/``alpha_pattern``/``exclude_modules``/``modules_to_save`` entry
            matches nothing, a target already has an adapter of this name, ``modules_to_save``
            overlaps the targets, an adapter is merged, or the model is already sharded by
            ``fully_shard``.
        TypeError: a matched module is of a kind torchdora cannot adapt (named with its type).

    A rank above a layer's ``min(in_features, out_features)`` is allowed (``B A`` simply cannot
    use the excess) but warned about, listing the layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_dora expects an nn.Module, got {type(model).__name__}")
    config = DoRAConfig() if config is None else config
    if not isinstance(config, DoRAConfig):
        raise TypeError(f"config must be a DoRAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if has_sharded_parameters(model):
        raise ValueError(
            "apply_dora must run before the model is sharded (fully_shard): it replaces modules, "
            "and DoRA layers have to be sharded together with their base layers"
        )
    existing = adapter_names(model)
    merged = [n for n, layer in dora_modules(model) if layer.merged]
    if merged:
        raise ValueError(f"apply_dora: adapters are merged into {merged[:3]}; unmerge them first")
    active = active_adapter(model) if existing else adapter_name
    if config.target_modules is None:
        logger.info("DoRA default target_modules for this model: %s", default_target_modules(model))

    targets = find_targets(model, config, adapter_name)
    names = [t.name for t in targets]
    _check_patterns(config, names)
    to_save = _modules_to_save(model, config, names)
    # Built before the model is touched, so a layer that cannot be built leaves it unchanged.
    new = {t.name: _make_layer(t, config, adapter_name) for t in targets if t.kind is not None}
    for target in targets:
        if target.kind is None:
            target.module.add_adapter(adapter_name, **_adapter_options(config, target.name))
    layers = [new.get(t.name, t.module) for t in targets]
    _warn_rank_too_large(names, layers, adapter_name)

    _freeze_all_but_adapters(model)
    for name, layer in zip(names, layers, strict=True):
        adapter = layer.get_adapter(adapter_name)
        if adapter.magnitude is not None:
            adapter.magnitude.requires_grad_(config.magnitude_trainable)
        if name in new:
            _set_submodule(model, name, layer)
            layer.active_adapter = active
        if config.bias == "dora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
        if adapter_name != active:
            adapter.freeze()
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                param.requires_grad_(True)
    for name in to_save:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            module = ModulesToSaveWrapper(module, adapter_name)
            module.active_adapter = active
            _set_submodule(model, name, module)
        module.modules_to_save[adapter_name].requires_grad_(adapter_name == active)
    return model


def _check_patterns(config: DoRAConfig, names: list[str]) -> None:
    """Every ``rank_pattern``/``alpha_pattern`` key must select at least one adapted module."""
    for option, patterns in (
        ("rank_pattern", config.rank_pattern),
        ("alpha_pattern", config.alpha_pattern),
    ):
        for pattern in patterns:
            if not any(pattern_matches(pattern, name) for name in names):
                raise ValueError(
                    f"{option} key {pattern!r} matches none of the adapted modules "
                    f"(e.g. {names[:5]})"
                )


def _adapter_options(config: DoRAConfig, name: str) -> dict:
    """The settings of the adapter ``config`` puts on the module ``name``."""
    return {
        "rank": config.rank_for(name),
        "alpha": config.alpha_for(name),
        "dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "detach_norm": config.detach_norm,
        "normalize": config.normalize,
        "eps": config.eps,
        "init": config.init,
    }


def _make_layer(target: Target, config: DoRAConfig, adapter_name: str) -> DoRALayer:
    module = target.module
    layer = target.kind.factory(
        module,
        **_adapter_options(config, target.name),
        freeze_base=False,  # _freeze_all_but_adapters freezes it with the rest of the model
        adapter_name=adapter_name,
    )
    return layer.train(module.training)


def _modules_to_save(model: nn.Module, config: DoRAConfig, targets: list[str]) -> list[str]:
    """Names of the modules to wrap; each entry must match, and none may hold or sit in a target."""
    if not config.modules_to_save:
        return []
    candidates = list(candidate_modules(model))
    names = []
    for entry in config.modules_to_save:
        matched = [n for n, _ in candidates if name_matches([entry], n)]
        if not matched:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        names += matched
    for name in names:
        clash = [
            t for t in targets if t == name or t.startswith(name + ".") or name.startswith(t + ".")
        ]
        if clash:
            raise ValueError(
                f"modules_to_save {name!r} overlaps the DoRA targets {clash[:5]}; a module is "
                "either adapted or trained in full"
            )
    return names


def _warn_rank_too_large(names: list[str], layers: list[DoRALayer], adapter_name: str) -> None:
    ranks = [layer.get_adapter(adapter_name).rank for layer in layers]
    too_large = [
        f"{name} ({layer.out_features}×{layer.in_features}, rank {rank})"
        for name, layer, rank in zip(names, layers, ranks, strict=True)
        if rank > min(layer.in_features, layer.out_features)
    ]
    if too_large:
        warnings.warn(
            "rank exceeds min(out_features, in_features) of "
            f"{', '.join(too_large)}: B·A cannot have a higher rank than that, so the extra "
            "rank only adds parameters. Lower rank (or use rank_pattern) for these layers.",
            UserWarning,
            stacklevel=3,
        )


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze every parameter except the trainable ones of adapters already in the model."""
    keep = {
        id(param)
        for _, module in candidate_modules(model)
        if isinstance(module, DoRALayer | ModulesToSaveWrapper)
        for param in module.parameters()
        if param.requires_grad
    }
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)
