"""DoRA (and its plain-LoRA sibling) on an ``nn.Linear`` base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_EPS, DEFAULT_RANK
from torchdora.layers.adapter import DoRAAdapter
from torchdora.layers.base import DoRALayer
from torchdora.layers.cache import forget_in_backward
from torchdora.quantization import is_quantized_linear


class DoRALinear(DoRALayer):
    """A linear layer ``y = (m / ‖W + s·B A‖) ⊙ (W x + s·B A x) + b`` with ``W``, ``b`` frozen.

    Build one from sizes (it owns a fresh ``nn.Linear`` base)::

        layer = DoRALinear(768, 768)                     # rank 8, alpha 16

    or wrap an existing layer without copying its weight::

        layer = DoRALinear.from_linear(model.fc, rank=8)

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: rank ``r`` of the update ``B A``.
        alpha: scale numerator, ``s = alpha / r``; ``None`` means ``alpha = rank``.
        bias: whether the fresh base layer has a bias.
        device, dtype: of the fresh base layer.
        **kwargs: the adapter options of :class:`~torchdora.layers.base.DoRALayer`
            (``dropout``, ``use_rslora``, ``use_dora``, ``detach_norm``, ``freeze_base``, ``eps``).

    Shapes:
        ``forward``: ``(..., in_features)`` → ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        base_layer: nn.Linear | None = None,
        **kwargs,
    ) -> None:
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__(base_layer, in_features, out_features, rank=rank, alpha=alpha, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float = DEFAULT_DROPOUT,
        use_rslora: bool = False,
        detach_norm: bool = False,
        freeze_base: bool = True,
        eps: float = DEFAULT_EPS,
        **kwargs,
    ) -> DoRALinear:
        """Wrap ``linear`` (kept by reference, not copied); the result starts equal to it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if is_quantized_linear(linear):
            raise TypeError(
                f"{type(linear).__name__} has a quantized weight; wrap it with "
                "QuantizedDoRALinear.from_module (apply_dora picks it automatically)"
            )
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            base_layer=linear,
            dropout=dropout,
            use_rslora=use_rslora,
            detach_norm=detach_norm,
            freeze_base=freeze_base,
            eps=eps,
            **kwargs,
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_features(x)
        self._check_dtype(x)
        if self.row_adapters is not None:
            return self._forward_rows(x)
        adapter = self._computing_adapter()
        if adapter is None:
            return self.base_layer(x)
        weight, bias = self.base_weight, self.base_layer.bias
        a, lora_input = adapter, self._lora_input(x, adapter)
        if not a.use_dora:
            return DF.lora_linear(
                x, weight, bias, a.lora_A, a.lora_B, a.scaling, lora_input=lora_input
            )
        if not a.normalize and torch.is_grad_enabled():  # m/‖W‖ is a plain per-row scale
            direction = DF.lora_linear(
                x, weight, None, a.lora_A, a.lora_B, a.scaling, lora_input=lora_input
            )
            return DF.rescale(direction, self.magnitude_scale(a), bias)
        # Compiled, m/n is not cached: the training form gets W Aᵀ from its stacked matmul.
        if not (torch.is_grad_enabled() or torch.compiler.is_compiling()) and lora_input is None:
            return DF.dora_linear_scaled(
                x, weight, bias, a.lora_A, a.lora_B, self.inference_scale(a), a.scaling
            )
        out = DF.dora_linear(
            x,
            weight,
            bias,
            a.lora_A,
            a.lora_B,
            a.magnitude,
            a.scaling,
            self.weight_sq_norm(),
            lora_input=lora_input,
            eps=a.eps,
            detach_norm=a.detach_norm,
        )
        forget_in_backward(a.scale_cache, out)
        return out

    def _rows_base(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base_weight)

    def _rows_low_rank(self, x: Tensor, adapter: DoRAAdapter) -> Tensor:
        return F.linear(F.linear(x, adapter.lora_A.to(x.dtype)), adapter.lora_B.to(x.dtype))


class LoRALinear(DoRALinear):
    """Plain LoRA with the same surface as :class:`DoRALinear`: ``y = W x + b + s·B A x``.

    The baseline DoRA is compared against in benchmarks and ``--method lora`` runs.
    """

    def __init__(self, in_features: int, out_features: int, *args, **kwargs) -> None:
        super().__init__(in_features, out_features, *args, use_dora=False, **kwargs)
