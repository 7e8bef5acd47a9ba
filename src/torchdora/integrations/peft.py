"""torchdora's DoRA inside an existing PEFT model: :func:`accelerate_peft` and :func:`restore_peft`.

``peft`` is imported here only when called (``pip install 'torchdora[peft]'``).
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings

from torch import nn

#: The PEFT releases (first, last; as ``(major, minor)``) whose DoRA variants
#: (``peft/tuners/lora/variants.py``) this module knows and is tested with.
SUPPORTED_PEFT = ((0, 19), (0, 21))
_RANGE = "peft {}.{} to {}.{}.x".format(*SUPPORTED_PEFT[0], *SUPPORTED_PEFT[1])
_MAX_NAMED = 5


def _check_peft() -> None:
    """Refuse a missing PEFT or one outside :data:`SUPPORTED_PEFT`, naming the range."""
    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"accelerate_peft needs PEFT ({_RANGE}): pip install 'torchdora[peft]'"
        ) from None
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if not SUPPORTED_PEFT[0] <= release <= SUPPORTED_PEFT[1]:
        raise RuntimeError(
            f"accelerate_peft supports {_RANGE}, found peft {version}; install a version in that "
            "range, or keep PEFT's own DoRA (do not call accelerate_peft)"
        )


def _lora_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every PEFT LoRA layer in ``model``; a ``TypeError`` if none."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise TypeError(
            f"{caller} expects a PEFT model with LoRA layers (get_peft_model(model, "
            f"LoraConfig(use_dora=True)) or PeftModel.from_pretrained), but this "
            f"{type(model).__name__} has none; for a model without PEFT use torchdora.apply_dora"
        )
    return layers


def accelerate_peft(model: nn.Module, *, exact_gradient: bool = False) -> nn.Module:
    """Compute every DoRA adapter of a PEFT model with torchdora, in place; returns ``model``.

    Each DoRA adapter of each PEFT LoRA layer (``nn.Linear``, ``transformers``' ``Conv1D``,
    ``nn.Embedding``, ``nn.Conv1d/2d/3d``, and bitsandbytes or torchao quantized Linears: PEFT's
    QDoRA, whose weight is then dequantized a block at a time instead of whole at every forward;
    bitsandbytes' CPU repacking is switched off, as torchdora's own QDoRA does) keeps its
    parameters (the same tensors: an optimizer
    built before or after still trains them, ``state_dict`` keys are unchanged) and PEFT's
    numbers, but runs the factored norm instead of PEFT's dense ``W + s·B A``. Everything else
    stays PEFT's: dropout, several adapters, ``disable_adapter()``, merging, saving and loading.
    Adapters added later run as PEFT has them until this is called again.

    Args:
        model: a ``PeftModel``, or any module holding PEFT LoRA layers.
        exact_gradient: ``False`` (default): PEFT's gradient, which treats the weight norm as a
            constant (paper §4.3); ``True``: the full gradient (torchdora's own default).

    Adapters torchdora cannot compute (other quantized or custom bases, grouped convolutions,
    variants it does not know) stay as PEFT has them, named in one warning.
    """
    if not isinstance(exact_gradient, bool):
        raise TypeError(f"exact_gradient must be a bool, got {type(exact_gradient).__name__}")
    _check_peft()
    from torchdora.integrations.peft_variants import AcceleratedVariant, accelerated_for

    skipped, dora_adapters = [], 0
    for name, layer in _lora_layers(model, "accelerate_peft"):
        for adapter, variant in list(layer.lora_variant.items()):
            original = variant.peft_variant if isinstance(variant, AcceleratedVariant) else variant
            if not layer.use_dora.get(adapter, False):
                continue
            dora_adapters += 1
            accelerated = accelerated_for(layer, original)
            if isinstance(accelerated, str):
                skipped.append(f"{name} (adapter {adapter!r}): {accelerated}")
                continue
            layer.lora_variant[adapter] = accelerated(original, exact_gradient)
    if not dora_adapters:
        warnings.warn(
            "accelerate_peft: this model has no DoRA adapter (LoraConfig(use_dora=True)); "
            "nothing to accelerate",
            stacklevel=2,
        )
    elif skipped:
        more = f"; and {len(skipped) - _MAX_NAMED} more" if len(skipped) > _MAX_NAMED else ""
        warnings.warn(
            f"accelerate_peft: {len(skipped)} of {dora_adapters} DoRA adapters stay on PEFT's "
            f"own code: {'; '.join(skipped[:_MAX_NAMED])}{more}",
            stacklevel=2,
        )
    return model


def restore_peft(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_peft`: every DoRA adapter runs PEFT's own code again (in place;
    returns ``model``). A model that was never accelerated is returned unchanged."""
    _check_peft()
    from torchdora.integrations.peft_variants import AcceleratedVariant

    for _, layer in _lora_layers(model, "restore_peft"):
        for adapter, variant in list(layer.lora_variant.items()):
            if isinstance(variant, AcceleratedVariant):
                layer.lora_variant[adapter] = variant.peft_variant
    return model
