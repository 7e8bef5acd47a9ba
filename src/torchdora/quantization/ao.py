"""torchao: an ``nn.Linear`` whose weight is a torchao tensor subclass.

``quantize_(model, Int8WeightOnlyConfig())`` and ``IntxWeightOnlyConfig(...)`` leave the module
an ``nn.Linear`` and swap its weight for a subclass with ``dequantize()``; NF4 is a weight
made with ``to_nf4`` (as torchtune's ``FrozenNF4Linear`` does), dequantized by
``get_original_weight()``. Both run through ``F.linear`` on the weight-only kernel.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from torchdora.quantization.backend import QuantizedBackend, defined_in
from torchdora.quantization.registry import register_backend

#: Group size of ``torchao-int4``: one scale and zero point per 64 weights of a row.
INT4_GROUP_SIZE = 64


def _is_nf4(weight: Tensor) -> bool:
    return type(weight).__name__ == "NF4Tensor"


class TorchAOBackend(QuantizedBackend):
    """Linear layers whose weight torchao has quantized (weight-only: int8, int4, NF4)."""

    name = "torchao"
    package = "torchao"
    extra = "torchao"
    methods = ("torchao-int8", "torchao-int4", "torchao-nf4")

    def owns(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            isinstance(module, nn.Linear) and weight is not None and defined_in(weight, "torchao")
        )

    def check(self, module: nn.Module) -> None:
        weight = module.weight
        if not (_is_nf4(weight) or hasattr(weight, "dequantize")):
            raise ValueError(
                f"torchao weight type {type(weight).__name__} has no dequantize(); "
                "QDoRA supports torchao's weight-only quantized tensors and NF4"
            )

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return tuple(module.weight.shape)

    def storage(self, module: nn.Module) -> Tensor:
        # The subclass itself has no storage (data_ptr() is 0); its first inner tensor has.
        names, _ = module.weight.__tensor_flatten__()
        return getattr(module.weight, names[0])

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        # The int4 kernel rejects other input dtypes and NF4 promotes: match the weight's.
        return module.weight.dtype

    def row_alignment(self, module: nn.Module) -> int:
        if _is_nf4(module.weight):  # the double-quantized scales come in blocks of blocks
            weight = module.weight
            period = weight.block_size * weight.scaler_block_size
            return period // math.gcd(period, weight.shape[1])
        block_size = getattr(module.weight, "block_size", (1,))
        return block_size[0]

    def chunk_rows(self, module: nn.Module, max_elements: int) -> int:
        rows = super().chunk_rows(module, max_elements)
        if not _is_nf4(module.weight):
            return rows
        # NF4Tensor splits only into equal parts: take the largest aligned divisor that fits.
        out_features, align = module.weight.shape[0], self.row_alignment(module)
        candidates = [d for d in range(align, out_features + 1, align) if out_features % d == 0]
        fitting = [d for d in candidates if d <= rows]
        return max(fitting) if fitting else min(candidates)

    def dequantize_rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        weight = module.weight
        if _is_nf4(weight):
            part = torch.split(weight, stop - start)[start // (stop - start)]
            return part.get_original_weight().float()
        return weight[start:stop].dequantize().float()

    def quantize(self, linear: nn.Linear, method: str) -> nn.Module:
        quantization = self.library(f"quantize method {method!r}").quantization
        quantized = copy.deepcopy(linear)
        if method == "torchao-nf4":
            block = 64 * 256  # to_nf4's default block size times its scaler block size
            if linear.weight.numel() % block:
                raise ValueError(
                    f"torchao-nf4 needs a weight with a multiple of {block} elements, got "
                    f"{tuple(linear.weight.shape)}"
                )
            quantized.weight = nn.Parameter(
                quantization.to_nf4(linear.weight.detach()), requires_grad=False
            )
            return quantized
        if method == "torchao-int8":
            config = quantization.Int8WeightOnlyConfig()
        else:
            if linear.in_features % INT4_GROUP_SIZE:
                raise ValueError(
                    f"torchao-int4 quantizes groups of {INT4_GROUP_SIZE} input features; "
                    f"in_features={linear.in_features} is not a multiple"
                )
            config = quantization.IntxWeightOnlyConfig(
                weight_dtype=torch.int4,
                granularity=quantization.granularity.PerGroup(INT4_GROUP_SIZE),
            )
        quantization.quantize_(quantized, config)
        return quantized


register_backend(TorchAOBackend())
