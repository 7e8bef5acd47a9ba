"""PEFT's DoRA variants, computed by torchdora: drop-in replacements for one adapter of one layer.

PEFT (0.17 and later) computes DoRA through a variant object per adapter
(``layer.lora_variant[name]``) whose ``forward(module, active_adapter, x, result)`` turns the
base layer's output into the adapted one. The classes here subclass PEFT's own variants, so
merging, unmerging and initialisation stay PEFT's code, and replace ``forward`` with the factored
norm (no ``d_out × d_in`` matrix) on PEFT's own parameters. PEFT's numbers are the contract:
the same forward (including its form with dropout) and, by default, PEFT's gradient, which
treats the norm as a constant (paper §4.3); ``exact_gradient=True`` gives the full gradient.

A forward this module cannot compute (a trainable base weight, a sharded or non-floating one)
runs PEFT's own code instead. Imported only by :func:`torchdora.integrations.accelerate_peft`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import dora as peft_dora
from peft.tuners.lora import layer as peft_layers
from peft.tuners.lora import variants as peft_variants
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_EPS
from torchdora.layers.cache import TensorCache
from torchdora.layers.dispatch import layer_kind_for

_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class AcceleratedVariant:
    """What every accelerated variant holds: the PEFT variant it replaced (for
    :func:`~torchdora.integrations.restore_peft`), the gradient setting, and two caches.

    ``‖W_i‖²`` is cached while the base weight is unchanged (``torchdora.layers.cache``). The norm
    ``n`` itself is cached only where PEFT caches it (``peft.tuners.lora.dora.ENABLE_DORA_CACHING``
    on and the layer in eval mode), and forgotten at any forward in training mode, as PEFT forgets
    its cache in ``train()``: an optimizer that updates parameters in place without bumping their
    version (``AdamW(fused=True)``) trains only through forwards in training mode.
    """

    #: the PEFT layer class this variant runs in, and the base kinds (torchdora's layer kind
    #: names, ``torchdora.layers.dispatch``) it computes
    layer_type: type[nn.Module]
    base_kinds: tuple[str, ...]

    def __init__(self, peft_variant: Any, exact_gradient: bool) -> None:
        self.peft_variant = peft_variant
        self.exact_gradient = exact_gradient
        self._weight_sq_norm = TensorCache()
        self._norm = TensorCache()

    @classmethod
    def refuses(cls, layer: nn.Module) -> str | None:
        """Why this variant cannot compute DoRA on the PEFT ``layer`` (``None``: it can)."""
        base = layer.get_base_layer()
        if type(layer) is not cls.layer_type:
            return f"PEFT computes {type(layer).__name__} layers its own way"
        kind = layer_kind_for(base)
        if kind is None or kind.name not in cls.base_kinds:
            return f"its base {type(base).__name__} is not one of {', '.join(cls.base_kinds)}"
        if not plain_weight(base.weight):
            return f"its base weight is a {type(base.weight).__name__} of {base.weight.dtype}"
        if getattr(base, "groups", 1) != 1:
            return "its base convolution has groups > 1"
        return None

    def computes(self, weight: Tensor) -> bool:
        """Whether torchdora computes this forward (else PEFT's own code runs): a plain
        floating-point base weight, frozen where a gradient is being recorded."""
        return plain_weight(weight) and not (weight.requires_grad and torch.is_grad_enabled())

    def weight_sq_norm(self, weight: Tensor) -> Tensor:
        """``‖W_i‖²`` of the ``(d_out, fan_in)`` matrix ``weight``, cached while it is unchanged."""

        def compute() -> Tensor:
            with torch.no_grad():
                return DF.weight_sq_row_norm(weight)

        cacheable = not torch.compiler.is_compiling()
        return self._weight_sq_norm.get([weight], None, compute, cacheable)

    def cached_norm(
        self, module: nn.Module, adapter: str, weight: Tensor, lora_A: Tensor, lora_B: Tensor
    ) -> Tensor | None:
        """The detached norm ``n`` where PEFT would use a cached one, else ``None``."""
        if torch.compiler.is_compiling():
            return None
        if module.training:
            self._norm.clear()
            return None
        if not peft_dora.ENABLE_DORA_CACHING:
            return None
        if self.exact_gradient and torch.is_grad_enabled():
            return None
        scaling = module.scaling[adapter]

        def compute() -> Tensor:
            with torch.no_grad():
                c = self.weight_sq_norm(weight)
                weight_a = F.linear(lora_A.to(weight.dtype), weight).T
                return DF.factored_row_norm(c, weight_a, lora_A, lora_B, scaling, DEFAULT_EPS)

        return self._norm.get([weight, lora_A, lora_B], scaling, compute)

    def scale(
        self, module: nn.Module, adapter: str, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
        magnitude: Tensor,
    ) -> Tensor:  # fmt: skip
        """``m / n`` per row in plain autograd ops (the kinds other than Linear), ``n``
        detached unless ``exact_gradient``."""
        norm = self.cached_norm(module, adapter, weight, lora_A, lora_B)
        if norm is None:
            c, s = self.weight_sq_norm(weight), module.scaling[adapter]
            weight_a = F.linear(lora_A.to(weight.dtype), weight).T
            norm = DF.factored_row_norm(c, weight_a, lora_A, lora_B, s, DEFAULT_EPS)
            if not self.exact_gradient:
                norm = norm.detach()
        return magnitude.reshape(-1).to(norm.dtype) / norm


def plain_weight(weight: Tensor) -> bool:
    """A floating-point weight of plain tensor type (no quantized or sharded subclass)."""
    return type(weight) in (Tensor, nn.Parameter) and weight.is_floating_point()


def _dropped(module: nn.Module, adapter: str, x: Tensor) -> Tensor | None:
    """``dropout(x)`` where PEFT's DoRA takes its base output on a dropped input, else ``None``."""
    dropout = module.lora_dropout[adapter]
    if isinstance(dropout, nn.Identity) or not module.training:
        return None
    return dropout(x)


class DoraLinearVariant(AcceleratedVariant, peft_variants.DoraLinearVariant):
    """PEFT's DoRA on ``nn.Linear`` and ``transformers``' ``Conv1D`` (``fan_in_fan_out``)."""

    layer_type = peft_layers.Linear
    base_kinds = ("nn.Linear", "transformers Conv1D")

    def forward(
        self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs
    ) -> Tensor:
        base = module.get_base_layer()
        weight = base.weight.T if module.fan_in_fan_out else base.weight
        if not self.computes(weight):
            return self.peft_variant.forward(
                module, active_adapter=active_adapter, x=x, result=result, **kwargs
            )
        a = active_adapter
        lora_A, lora_B = module.lora_A[a].weight, module.lora_B[a].weight
        magnitude = module.lora_magnitude_vector[a].weight
        lora_x = _dropped(module, a, x)
        base_dropped = None if lora_x is None else F.linear(lora_x.to(result.dtype), weight)
        return DF.dora_from_base_output(
            result,
            x if lora_x is None else lora_x,
            base_dropped,
            weight,
            base.bias,
            lora_A,
            lora_B,
            magnitude,
            module.scaling[a],
            self.weight_sq_norm(weight),
            eps=DEFAULT_EPS,
            detach_norm=not self.exact_gradient,
            norm=self.cached_norm(module, a, weight, lora_A, lora_B),
        )


class DoraEmbeddingVariant(AcceleratedVariant, peft_variants.DoraEmbeddingVariant):
    """PEFT's DoRA on ``nn.Embedding``: one magnitude per embedding dimension, the norm over
    the columns of the table ``E`` (the rows of ``Eᵀ``)."""

    layer_type = peft_layers.Embedding
    base_kinds = ("nn.Embedding",)

    def forward(
        self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs
    ) -> Tensor:
        weight = module.get_base_layer().weight.T
        if not self.computes(weight):
            return self.peft_variant.forward(
                module, active_adapter=active_adapter, x=x, result=result, **kwargs
            )
        a = active_adapter
        lora_A, lora_B = module.lora_embedding_A[a], module.lora_embedding_B[a]
        magnitude = module.lora_magnitude_vector[a].weight
        scale = self.scale(module, a, weight, lora_A, lora_B, magnitude)
        low_rank = (module._embed(x, lora_A.T) @ lora_B.T) * module.scaling[a]
        embed_scale = getattr(module, "_get_embed_scale", lambda: None)()
        if embed_scale is not None:
            low_rank = low_rank * embed_scale.to(low_rank.dtype)
        return scale * (result + low_rank)


class _DoraConvNdVariant(AcceleratedVariant):
    """PEFT's DoRA on ``nn.Conv1d/2d/3d`` with ``groups=1``: one magnitude per output channel."""

    def forward(
        self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs
    ) -> Tensor:
        base = module.get_base_layer()
        kernel = base.weight
        weight = kernel.flatten(1)
        if not self.computes(kernel):
            return self.peft_variant.forward(
                module, active_adapter=active_adapter, x=x, result=result, **kwargs
            )
        a = active_adapter
        lora_A, lora_B = module.lora_A[a], module.lora_B[a]
        rank = lora_A.weight.shape[0]
        magnitude = module.lora_magnitude_vector[a].weight
        scale = self.scale(
            module, a, weight, lora_A.weight.flatten(1), lora_B.weight.reshape(-1, rank), magnitude
        ).view(1, -1, *([1] * (kernel.dim() - 2)))
        lora_x = _dropped(module, a, x)
        if lora_x is None:
            lora_x = x
            direction = result if base.bias is None else result - base.bias.view(scale.shape)
        else:  # PEFT's form with dropout: the base output on the dropped input
            direction = _CONV_FN[kernel.dim()](
                lora_x, kernel, None, base.stride, base.padding, base.dilation, base.groups
            )
        low_rank = lora_B(lora_A(lora_x)) * module.scaling[a]
        return result + (scale - 1) * direction + scale * low_rank


class DoraConv1dVariant(_DoraConvNdVariant, peft_variants.DoraConv1dVariant):
    """PEFT's DoRA on ``nn.Conv1d``."""

    layer_type, base_kinds = peft_layers.Conv1d, ("nn.Conv1d",)


class DoraConv2dVariant(_DoraConvNdVariant, peft_variants.DoraConv2dVariant):
    """PEFT's DoRA on ``nn.Conv2d``."""

    layer_type, base_kinds = peft_layers.Conv2d, ("nn.Conv2d",)


class DoraConv3dVariant(_DoraConvNdVariant, peft_variants.DoraConv3dVariant):
    """PEFT's DoRA on ``nn.Conv3d``."""

    layer_type, base_kinds = peft_layers.Conv3d, ("nn.Conv3d",)


#: PEFT's variant class → the class replacing it.
ACCELERATED = {
    peft_variants.DoraLinearVariant: DoraLinearVariant,
    peft_variants.DoraEmbeddingVariant: DoraEmbeddingVariant,
    peft_variants.DoraConv1dVariant: DoraConv1dVariant,
    peft_variants.DoraConv2dVariant: DoraConv2dVariant,
    peft_variants.DoraConv3dVariant: DoraConv3dVariant,
}
