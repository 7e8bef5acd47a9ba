"""PEFT's DoRA variants, computed by torchdora: drop-in replacements for one adapter of one layer.

PEFT (0.17 and later) computes DoRA through a variant object per adapter
(``layer.lora_variant[name]``) whose ``forward(module, active_adapter, x, result)`` turns the
base layer's output into the adapted one. The classes here subclass PEFT's own variants, so
merging, unmerging and initialisation stay PEFT's code, and replace ``forward`` with the factored
norm (no ``d_out × d_in`` matrix; a quantized weight is dequantized a block of rows at a time)
on PEFT's own parameters. PEFT's numbers are the contract: the same forward (including its form
with dropout) and, by default, PEFT's gradient, which treats the norm as a constant (paper §4.3);
``exact_gradient=True`` gives the full gradient.

A forward this module cannot compute (a trainable base weight, a sharded one) runs PEFT's own
code instead. Imported only by :func:`torchdora.integrations.accelerate_peft`.
"""

from __future__ import annotations

import contextlib
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
from torchdora.quantization import backend_for

_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_QUANTIZED_KIND = "quantized Linear (bitsandbytes, torchao)"


class AcceleratedVariant:
    """What every accelerated variant shares: the PEFT variant it replaced (for
    :func:`~torchdora.integrations.restore_peft`), the gradient setting, and the norm.

    A kind says how to read its base weight as the ``(d_out, fan_in)`` matrix ``W`` DoRA
    normalises (:meth:`weight_matrix`). ``‖W_i‖²`` is cached while the base weight is unchanged
    (``torchdora.layers.cache``). The norm ``n`` itself is cached only where PEFT caches it
    (``peft.tuners.lora.dora.ENABLE_DORA_CACHING`` on and the layer in eval mode) and forgotten
    at any forward in training mode, as PEFT forgets its cache in ``train()``: an optimizer that
    updates parameters without bumping their version (``AdamW(fused=True)``) trains only through
    forwards in training mode.
    """

    #: the PEFT variant class replaced, the PEFT layer classes it runs in, and the base kinds
    #: (torchdora's layer kind names, ``torchdora.layers.dispatch``) it computes
    peft_variant_type: type
    layer_types: tuple[type[nn.Module], ...]
    base_kinds: tuple[str, ...]

    def __init__(self, peft_variant: Any, exact_gradient: bool) -> None:
        self.peft_variant = peft_variant
        self.exact_gradient = exact_gradient
        self._weight_sq_norm = TensorCache()
        self._norm = TensorCache()

    @classmethod
    def refuses(cls, layer: nn.Module) -> str | None:
        """Why this variant cannot compute DoRA on the PEFT ``layer``, one of
        :attr:`layer_types` (``None``: it can)."""
        base = layer.get_base_layer()
        kind = layer_kind_for(base)
        if kind is None or kind.name not in cls.base_kinds:
            return f"its base {type(base).__name__} is not one of {', '.join(cls.base_kinds)}"
        if getattr(base, "groups", 1) != 1:
            return "its base convolution has groups > 1"
        return None

    # ----------------------------------------------------------------- the base weight
    def weight_matrix(self, module: nn.Module, base: nn.Module) -> Tensor:
        """``base``'s weight as ``(d_out, fan_in)`` (a view where the layout allows)."""
        return base.weight

    def computes(self, base: nn.Module) -> bool:
        """Whether torchdora computes this forward (else PEFT's own code runs): a plain
        floating-point base weight, frozen where a gradient is being recorded."""
        weight = base.weight
        plain = type(weight) in (Tensor, nn.Parameter) and weight.is_floating_point()
        return plain and not (weight.requires_grad and torch.is_grad_enabled())

    def weight_sq_norm(self, weight: Tensor, base: nn.Module) -> Tensor:
        """``‖W_i‖²`` of ``weight`` (:meth:`weight_matrix`), cached while it is unchanged."""

        def compute() -> Tensor:
            with torch.no_grad():
                return DF.weight_sq_row_norm(weight)

        cacheable = not torch.compiler.is_compiling()
        return self._weight_sq_norm.get([weight], None, compute, cacheable)

    def weight_a(self, weight: Tensor, base: nn.Module, lora_A: Tensor) -> Tensor:
        """``P = W Aᵀ`` (``d_out × r``): one ``r``-row pass over ``W`` in its own dtype."""
        return F.linear(DF.cast(lora_A, weight.dtype), weight).t()

    # ----------------------------------------------------------------- the norm
    def row_norm(
        self, module: nn.Module, base: nn.Module, adapter: str, lora_A: Tensor, lora_B: Tensor
    ) -> Tensor:
        """``n = ‖W + s·B A‖`` per row, factored; a constant unless ``exact_gradient``."""
        weight = self.weight_matrix(module, base)
        scaling, cacheable = module.scaling[adapter], not torch.compiler.is_compiling()
        if cacheable and module.training:
            self._norm.clear()
        cached = cacheable and not module.training and peft_dora.ENABLE_DORA_CACHING
        exact = self.exact_gradient and torch.is_grad_enabled()

        def compute() -> Tensor:
            with contextlib.nullcontext() if exact else torch.no_grad():
                c = self.weight_sq_norm(weight, base)
                weight_a = self.weight_a(weight, base, lora_A)
                return DF.factored_row_norm(c, weight_a, lora_A, lora_B, scaling, DEFAULT_EPS)

        if cached and not exact:
            return self._norm.get([weight, lora_A, lora_B], scaling, compute)
        return compute()

    def scale(
        self, module: nn.Module, base: nn.Module, adapter: str, lora_A: Tensor, lora_B: Tensor,
        magnitude: Tensor,
    ) -> Tensor:  # fmt: skip
        """``m / n`` per row in plain autograd ops (the kinds other than Linear)."""
        norm = self.row_norm(module, base, adapter, lora_A, lora_B)
        return DF.cast(magnitude.reshape(-1), norm.dtype) / norm

    def peft_forward(self, module: nn.Module, adapter: str, x: Tensor, result: Tensor, **kwargs):
        return self.peft_variant.forward(
            module, active_adapter=adapter, x=x, result=result, **kwargs
        )


def _dropped(module: nn.Module, adapter: str, x: Tensor) -> Tensor | None:
    """``dropout(x)`` where PEFT's DoRA takes its base output on a dropped input, else ``None``."""
    dropout = module.lora_dropout[adapter]
    if isinstance(dropout, nn.Identity) or not module.training:
        return None
    return dropout(x)


class DoraLinearVariant(AcceleratedVariant, peft_variants.DoraLinearVariant):
    """PEFT's DoRA on ``nn.Linear`` and ``transformers``' ``Conv1D`` (``fan_in_fan_out``)."""

    peft_variant_type = peft_variants.DoraLinearVariant
    layer_types = (peft_layers.Linear,)
    base_kinds = ("nn.Linear", "transformers Conv1D")

    def weight_matrix(self, module: nn.Module, base: nn.Module) -> Tensor:
        return base.weight.t() if module.fan_in_fan_out else base.weight

    def base_output(self, module: nn.Module, base: nn.Module, x: Tensor, dtype) -> Tensor:
        """``W x`` without the bias, in ``dtype`` (the base output's)."""
        return F.linear(DF.cast(x, dtype), self.weight_matrix(module, base))

    def forward(
        self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs
    ) -> Tensor:
        base = module.get_base_layer()
        if not self.computes(base):
            return self.peft_forward(module, active_adapter, x, result, **kwargs)
        a = active_adapter
        lora_A, lora_B = module.lora_A[a].weight, module.lora_B[a].weight
        lora_x = _dropped(module, a, x)
        dropped = None if lora_x is None else self.base_output(module, base, lora_x, result.dtype)
        return DF.dora_from_base_output(
            result,
            x if lora_x is None else lora_x,
            dropped,
            base.bias,
            lora_A,
            lora_B,
            module.lora_magnitude_vector[a].weight,
            module.scaling[a],
            self.row_norm(module, base, a, lora_A, lora_B),
        )


def _quantized_layer_types() -> tuple[type[nn.Module], ...]:
    """PEFT's LoRA layers over bitsandbytes and torchao bases: its own classes for them (those
    whose library is here), and its plain Linear, which wraps them too when a model is not
    marked as loaded in 4 or 8 bits."""
    from peft.tuners.lora import bnb, torchao

    found = [getattr(bnb, name, None) for name in ("Linear4bit", "Linear8bitLt")]
    own = tuple(t for t in (*found, torchao.TorchaoLoraLinear) if t is not None)
    return (*own, peft_layers.Linear)


class QuantizedDoraLinearVariant(DoraLinearVariant):
    """PEFT's DoRA on a bitsandbytes (``Linear4bit``, ``Linear8bitLt``) or torchao base.

    PEFT dequantizes the whole weight at every forward; here ``‖Ŵ_i‖²`` is computed once by
    dequantizing a block of rows at a time and cached (torchdora's QDoRA backends), and
    ``P = Ŵ Aᵀ`` takes one pass over the blocks, never the whole ``Ŵ`` at once.
    """

    layer_types = _quantized_layer_types()
    base_kinds = (_QUANTIZED_KIND,)

    @classmethod
    def refuses(cls, layer: nn.Module) -> str | None:
        """As for any kind, and the backend's own check, which also switches off library
        behaviours that would repack the weight behind the cache (bitsandbytes on CPU)."""
        reason = super().refuses(layer)
        if reason is None:
            base = layer.get_base_layer()
            try:
                backend_for(base).check(base)
            except ValueError as error:
                return str(error)
        return reason

    def weight_matrix(self, module: nn.Module, base: nn.Module) -> Tensor:
        """The tensor holding the packed weight: the caches key on it (never dequantized)."""
        return backend_for(base).storage(base)

    def computes(self, base: nn.Module) -> bool:
        return True  # a quantized weight cannot be trained

    def weight_sq_norm(self, weight: Tensor, base: nn.Module) -> Tensor:
        def compute() -> Tensor:
            return backend_for(base).row_sq_norm(base)

        cacheable = not torch.compiler.is_compiling()
        return self._weight_sq_norm.get([weight], None, compute, cacheable)

    def weight_a(self, weight: Tensor, base: nn.Module, lora_A: Tensor) -> Tensor:
        return backend_for(base).weight_times(base, lora_A)

    def base_output(self, module: nn.Module, base: nn.Module, x: Tensor, dtype) -> Tensor:
        """``Ŵ x``: the library's kernel where it is linear in its input, else (a kernel that
        quantizes its input too) from the dequantized blocks, as PEFT's dequantized matmul."""
        backend = backend_for(base)
        if not backend.is_linear_in_input(base):
            flat = x.reshape(-1, x.shape[-1])
            return backend.weight_times(base, flat).T.reshape(*x.shape[:-1], -1).to(dtype)
        out = backend.run(base, x)
        return (out if base.bias is None else out - base.bias.to(out.dtype)).to(dtype)


class DoraEmbeddingVariant(AcceleratedVariant, peft_variants.DoraEmbeddingVariant):
    """PEFT's DoRA on ``nn.Embedding``: one magnitude per embedding dimension, the norm over
    the columns of the table ``E`` (the rows of ``Eᵀ``)."""

    peft_variant_type = peft_variants.DoraEmbeddingVariant
    layer_types = (peft_layers.Embedding,)
    base_kinds = ("nn.Embedding",)

    def weight_matrix(self, module: nn.Module, base: nn.Module) -> Tensor:
        return base.weight.t()

    def forward(
        self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs
    ) -> Tensor:
        base = module.get_base_layer()
        if not self.computes(base):
            return self.peft_forward(module, active_adapter, x, result, **kwargs)
        a = active_adapter
        lora_A, lora_B = module.lora_embedding_A[a], module.lora_embedding_B[a]
        magnitude = module.lora_magnitude_vector[a].weight
        scale = self.scale(module, base, a, lora_A, lora_B, magnitude)
        low_rank = (module._embed(x, lora_A.T) @ lora_B.T) * module.scaling[a]
        embed_scale = getattr(module, "_get_embed_scale", lambda: None)()
        if embed_scale is not None:
            low_rank = low_rank * embed_scale.to(low_rank.dtype)
        return scale * (result + low_rank)


class _DoraConvNdVariant(AcceleratedVariant):
    """PEFT's DoRA on ``nn.Conv1d/2d/3d`` with ``groups=1``: one magnitude per output channel."""

    def weight_matrix(self, module: nn.Module, base: nn.Module) -> Tensor:
        return base.weight.flatten(1)

    def forward(
        self, module: nn.Module, active_adapter: str, x: Tensor, result: Tensor, **kwargs
    ) -> Tensor:
        base, a = module.get_base_layer(), active_adapter
        if not self.computes(base):
            return self.peft_forward(module, active_adapter, x, result, **kwargs)
        kernel = base.weight
        lora_A, lora_B = module.lora_A[a], module.lora_B[a]
        rank = lora_A.weight.shape[0]
        scale = self.scale(
            module,
            base,
            a,
            lora_A.weight.flatten(1),
            lora_B.weight.reshape(-1, rank),
            module.lora_magnitude_vector[a].weight,
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

    peft_variant_type = peft_variants.DoraConv1dVariant
    layer_types, base_kinds = (peft_layers.Conv1d,), ("nn.Conv1d",)


class DoraConv2dVariant(_DoraConvNdVariant, peft_variants.DoraConv2dVariant):
    """PEFT's DoRA on ``nn.Conv2d``."""

    peft_variant_type = peft_variants.DoraConv2dVariant
    layer_types, base_kinds = (peft_layers.Conv2d,), ("nn.Conv2d",)


class DoraConv3dVariant(_DoraConvNdVariant, peft_variants.DoraConv3dVariant):
    """PEFT's DoRA on ``nn.Conv3d``."""

    peft_variant_type = peft_variants.DoraConv3dVariant
    layer_types, base_kinds = (peft_layers.Conv3d,), ("nn.Conv3d",)


ACCELERATED: tuple[type[AcceleratedVariant], ...] = (
    DoraLinearVariant,
    QuantizedDoraLinearVariant,
    DoraEmbeddingVariant,
    DoraConv1dVariant,
    DoraConv2dVariant,
    DoraConv3dVariant,
)


def accelerated_for(layer: nn.Module, peft_variant: Any) -> type[AcceleratedVariant] | str:
    """The class that computes ``peft_variant`` on ``layer``, or why there is none."""
    known = [c for c in ACCELERATED if type(peft_variant) is c.peft_variant_type]
    if not known:
        return f"its variant {type(peft_variant).__name__} is not one torchdora knows"
    matching = [c for c in known if type(layer) in c.layer_types]
    if not matching:
        return f"PEFT computes {type(layer).__name__} layers its own way"
    reasons = []
    for candidate in matching:
        reason = candidate.refuses(layer)
        if reason is None:
            return candidate
        reasons.append(reason)
    return reasons[0]
