"""DoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` bases."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_RANK
from torchdora.layers.adapter import DoRAAdapter
from torchdora.layers.base import DoRALayer

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class DoRAConv(DoRALayer):
    """A convolution adapted with DoRA, one magnitude per output channel.

    The kernel ``W`` (``out_channels × in_channels/groups × *kernel_size``) is viewed as the
    matrix ``out_channels × fan_in`` with ``fan_in = in_channels/groups · ∏kernel_size``; DoRA
    acts on its rows. ``A`` (``r × fan_in``) is applied as a convolution with the base's kernel
    size, stride, padding, dilation, padding mode and groups (each group uses the same ``A``);
    ``B`` (``out_channels × r``) as a 1×1 convolution with the base's groups, so that
    ``ΔW = s·B A`` row-wise and ``y = (m/n) ⊙ (conv(x, W) + s·B(A * x)) + b``, per channel.

    ``A`` and ``B`` are stored flat; PEFT's layout is ``A.view(r, in_channels/groups, *k)`` and
    ``B.view(out_channels, r, 1, …)`` (identical for ``groups=1``).

    Args:
        base_layer: the ``nn.Conv1d/2d/3d`` to adapt (kept by reference, not copied).
        rank, alpha: ``r`` and the scale numerator, ``s = alpha / r``.
        **options: the adapter options of :class:`~torchdora.layers.base.DoRALayer`.

    Shapes:
        ``forward``: ``(N, in_channels, *spatial)`` or unbatched ``(in_channels, *spatial)`` →
        the base layer's output shape.
    """

    def __init__(
        self,
        base_layer: ConvNd,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        **options,
    ) -> None:
        if not isinstance(base_layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            raise TypeError(f"DoRAConv expects an nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        fan_in = base_layer.weight[0].numel()
        super().__init__(
            base_layer, fan_in, base_layer.out_channels, rank=rank, alpha=alpha, **options
        )

    def weight_matrix(self, weight: Tensor | None = None) -> Tensor:
        weight = self.base_weight if weight is None else weight
        return weight.reshape(weight.shape[0], -1)

    def peft_shapes(self, adapter: DoRAAdapter) -> dict[str, tuple[int, ...]]:
        if self.base_layer.groups > 1:
            raise ValueError(
                "a convolution with groups > 1 cannot be written in PEFT's format: PEFT factors "
                "grouped-conv LoRA differently (full-width A, grouped B)"
            )
        kernel, ones = self.base_weight.shape, (1,) * (self.base_weight.dim() - 2)
        r, out = adapter.rank, self.out_features
        return {"lora_A": (r, *kernel[1:]), "lora_B": (out, r, *ones), "magnitude": (1, out, *ones)}

    def store_weight_matrix(self, matrix: Tensor) -> None:
        # reshape() copies a channels_last kernel, so write through the parameter's own shape.
        self.base_weight.copy_(matrix.reshape(self.base_weight.shape))

    def _low_rank(self, x: Tensor, adapter: DoRAAdapter) -> Tensor:
        """``B(A * x)`` with the base's geometry: ``(N, out_channels, *spatial_out)``."""
        base, weight = self.base_layer, self.base_weight
        groups = base.groups
        lora_A = adapter.lora_A.to(x.dtype).view(adapter.rank, *weight.shape[1:])
        if groups > 1:  # every group sees the same A: r output channels per group
            lora_A = lora_A.repeat(groups, *([1] * (weight.dim() - 1)))
        after_a = base._conv_forward(x, lora_A, None)
        lora_B = adapter.lora_B
        kernel_1x1 = lora_B.to(x.dtype).view(*lora_B.shape, *([1] * (weight.dim() - 2)))
        return _CONV_FN[weight.dim() - 2](after_a, kernel_1x1, groups=groups)

    @property
    def _scale_shape(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self.base_weight.dim() - 2)  # over the spatial dims

    def _rows_bias(self) -> Tensor | None:
        bias = self.base_layer.bias
        return None if bias is None else bias.view(self._scale_shape)

    def _rows_base(self, x: Tensor) -> Tensor:
        return self.base_layer._conv_forward(x, self.base_weight, None)

    _rows_low_rank = _low_rank

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        spatial = self.base_weight.dim() - 2
        if x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != base.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, in_channels, *spatial) or "
                f"(in_channels, *spatial) with in_channels={base.in_channels} and {spatial} "
                f"spatial dims (its base {type(base).__name__}'s), got shape {tuple(x.shape)}"
            )
        self._check_dtype(x)
        if self.row_adapters is not None:
            return self._forward_rows(x)
        adapter = self._computing_adapter()
        if adapter is None:
            return base(x)
        lora_input = self._lora_input(x, adapter)
        low_rank = self._low_rank(x if lora_input is None else lora_input, adapter)
        if not adapter.use_dora:
            return base(x) + adapter.scaling * low_rank
        channel_view = (-1,) + (1,) * (self.base_weight.dim() - 2)  # broadcast over spatial dims
        direction = base._conv_forward(x, self.base_weight, None) + adapter.scaling * low_rank
        bias = None if base.bias is None else base.bias.view(channel_view)
        return DF.rescale(direction, self.magnitude_scale(adapter).view(channel_view), bias)
