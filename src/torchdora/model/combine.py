"""``combine_adapters``: one new adapter from a weighted sum of others, defined so that it is
right for DoRA.

For weights ``wᵢ`` the combined adapter of a layer is::

    direction update   ΔV = Σᵢ wᵢ·sᵢ·Bᵢ Aᵢ   exactly: A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …],
                                            rank Σ rᵢ, s = 1
    magnitude          m  = m₀ + Σᵢ wᵢ·(mᵢ − m₀),   m₀ = ‖W_j‖ per row (the base's norms)

Both are linear in each adapter's change from the base, as task arithmetic adds LoRA updates:
weight 0 leaves the base, one adapter at weight 1 is that adapter exactly, two at weight 1 add
both changes. A layer without an adapter contributes nothing there. (PEFT's
``add_weighted_adapter`` concatenates the factors but sums the magnitudes, which is the base's
magnitude only for weights summing to 1, and mixes ``m`` with norms of another ``V``.)
"""

from __future__ import annotations

import torch
from torch import nn

from torchdora.distributed import copy_full_, full_tensor
from torchdora.layers.adapter import check_adapter_name
from torchdora.model.adapters import adapter_holders, adapter_names, check_known
from torchdora.model.ops import dora_modules


def combine_adapters(model: nn.Module, weights: dict[str, float], new_name: str) -> nn.Module:
    """Add adapter ``new_name`` = the weighted combination of ``weights`` (name → weight).

    The result is an ordinary adapter (DoRA if the inputs are DoRA, LoRA if they are LoRA):
    it saves, loads in PEFT, merges and mixes like any other. As with
    :func:`~torchdora.apply_dora`'s later adapters it is added inactive: ``set_adapter(model,
    new_name)`` uses it. Its dropout is 0. Refused: an unknown or existing name, no weights,
    a non-finite weight, DoRA mixed with LoRA, adapters with ``modules_to_save`` copies (a
    head trained in full has no meaningful weighted sum), or a merged adapter. Returns ``model``.
    """
    check_adapter_name(new_name)
    if new_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {new_name!r}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("combine_adapters needs {adapter name: weight, ...} with at least one")
    for name, weight in weights.items():
        check_known(model, name)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"the weight of {name!r} must be a number, got {weight!r}")
        if not torch.isfinite(torch.tensor(float(weight))):
            raise ValueError(f"the weight of {name!r} must be finite, got {weight}")
    layers = []
    for module_name, layer in dora_modules(model):
        parts = [(layer.adapters[n], float(w)) for n, w in weights.items() if n in layer.adapters]
        if parts:
            layers.append((module_name, layer, parts))
    _check_combinable(model, weights, layers)
    for _, layer, parts in layers:
        _add_combination(layer, parts, new_name)
    return model


def _check_combinable(model: nn.Module, weights: dict[str, float], layers: list) -> None:
    kinds = {(a.use_dora, a.normalize) for _, _, parts in layers for a, _ in parts}
    if len(kinds) > 1 and len({use_dora for use_dora, _ in kinds}) == 1:
        raise ValueError(
            "combine_adapters: these adapters mix DoRA and its no-norm variant (normalize=False), "
            "which divide by different norms; combine adapters of one kind"
        )
    if len(kinds) > 1:
        raise ValueError(
            "combine_adapters: these adapters mix DoRA and plain LoRA; a combination of both has "
            "no single magnitude. Combine DoRA adapters and LoRA adapters separately"
        )
    for holder_name, holder in adapter_holders(model):
        copies = getattr(holder, "modules_to_save", {})
        if any(name in copies for name in weights):
            raise ValueError(
                f"combine_adapters: {holder_name!r} is trained in full (modules_to_save) by "
                "these adapters; a weighted sum of whole modules is not an adapter. Combine "
                "adapters without modules_to_save"
            )
    merged = [name for name, layer, _ in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"combine_adapters: adapters are merged into {merged[:3]}; unmerge first"
        )


@torch.no_grad()
def _add_combination(layer, parts: list, new_name: str) -> None:
    """Give ``layer`` the adapter ``new_name`` combining ``parts`` (``(adapter, weight)``)."""
    first = parts[0][0]
    rank = sum(adapter.rank for adapter, _ in parts)
    combined = layer.add_adapter(
        new_name,
        rank=rank,
        alpha=float(rank),  # s = 1: the weights and scalings go into B
        dropout=0.0,
        use_dora=first.use_dora,
        detach_norm=first.detach_norm,
        eps=first.eps,
        normalize=first.normalize,
    )
    lora_A = torch.cat([full_tensor(a.lora_A) for a, _ in parts])
    lora_B = torch.cat([full_tensor(a.lora_B) * (w * a.scaling) for a, w in parts], dim=1)
    copy_full_(combined.lora_A, lora_A)
    copy_full_(combined.lora_B, lora_B)
    if combined.magnitude is not None:
        base_norm = layer.weight_sq_norm().sqrt()
        magnitude = base_norm.clone()
        for adapter, weight in parts:
            magnitude += weight * (full_tensor(adapter.magnitude).to(base_norm.dtype) - base_norm)
        copy_full_(combined.magnitude, magnitude)
    combined.freeze()  # added inactive, as apply_dora's later adapters are
