"""bitsandbytes: ``Linear4bit`` (NF4, FP4; what ``transformers``' ``BitsAndBytesConfig`` makes)
and ``Linear8bitLt`` with ``has_fp16_weights=False`` (LLM.int8()).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchdora.quantization.backend import QuantizedBackend, defined_in
from torchdora.quantization.registry import register_backend

_FOUR_BIT = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}


def _is_4bit(module: nn.Module) -> bool:
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def _is_8bit(module: nn.Module) -> bool:
    return any(cls.__name__ == "Linear8bitLt" for cls in type(module).__mro__)


def _quant_state(module: nn.Module):
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


class BitsandbytesBackend(QuantizedBackend):
    """``Linear4bit`` and ``Linear8bitLt`` layers of bitsandbytes.

    On CPUs with AVX512-BF16, an eval-mode ``Linear4bit`` repacks its weight for a bf16
    inference kernel the first time it runs without autograd, rounding its block scales to
    bf16 on the way. :meth:`check` undoes a repacking that already happened and switches it off
    for the module (``module.support_avx512bf16_for_cpu = False``), so the weight the adapter's
    norm was computed from stays the weight the forward uses.
    """

    name = "bitsandbytes"
    package = "bitsandbytes"
    extra = "bnb"
    methods = ("bnb-nf4", "bnb-fp4", "bnb-int8")

    def owns(self, module: nn.Module) -> bool:
        return defined_in(module, "bitsandbytes") and (_is_4bit(module) or _is_8bit(module))

    def num_weights(self, param: Tensor) -> int | None:
        # A Params4bit's quant state keeps the weight's own shape (None until it is quantized).
        state = getattr(param, "quant_state", None)
        return math.prod(state.shape) if state is not None else None

    def check(self, module: nn.Module) -> None:
        if _is_8bit(module):
            if module.state.has_fp16_weights or module.weight.dtype != torch.int8:
                raise ValueError(
                    "this Linear8bitLt holds a float weight, not an int8 one: build it with "
                    "has_fp16_weights=False and move it to its device (.to('cpu') or .cuda()), "
                    "which is when bitsandbytes quantizes"
                )
            return
        state = _quant_state(module)
        if state is None or not getattr(module.weight, "bnb_quantized", True):
            raise ValueError(
                "this Linear4bit is not quantized yet: bitsandbytes quantizes it when it is "
                "moved to its device; call .to('cpu') (or .cuda()) first"
            )
        if getattr(state, "packing_format_for_cpu", False):
            functional = self.library("dequantizing a bitsandbytes layer").functional
            module.weight.data, module.weight.quant_state = (
                functional._convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            )
        module.support_avx512bf16_for_cpu = False

    def shape(self, module: nn.Module) -> tuple[int, int]:
        if _is_8bit(module):
            return tuple(module.weight.shape)
        return tuple(_quant_state(module).shape)

    def storage(self, module: nn.Module) -> Tensor:
        return module.weight

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        if _is_8bit(module):
            return torch.float32
        return module.compute_dtype or _quant_state(module).dtype

    def is_linear_in_input(self, module: nn.Module) -> bool:
        # Linear8bitLt dequantizes W and runs a float matmul only when training on CPU/XPU;
        # otherwise it quantizes its input to int8 too (bitsandbytes.autograd.matmul).
        if _is_8bit(module):
            return module.training and module.weight.device.type in ("cpu", "xpu")
        return True

    def row_alignment(self, module: nn.Module) -> int:
        # Where 4-bit blocks straddle rows, bitsandbytes' AVX512 CPU kernel assigns them scales
        # by the call's shape (``in_features // blocksize`` blocks a row), not as quantize_4bit
        # laid them out; dequantizing such a weight whole reproduces what its forward computes.
        if _is_8bit(module):
            return 1
        out_features, in_features = self.shape(module)
        return 1 if in_features % _quant_state(module).blocksize == 0 else out_features

    def dequantize_rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        functional = self.library("dequantizing a bitsandbytes layer").functional
        in_features = self.shape(module)[1]
        if _is_8bit(module):
            # A weight not yet run holds its own scales; after a forward they live in .state.
            scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            rows = functional.int8_vectorwise_dequant(
                module.weight.data[start:stop], scb[start:stop]
            )
            return rows.float()
        state = _quant_state(module)
        first, last = start * in_features, stop * in_features  # element range of the rows
        packed = module.weight.data.view(torch.uint8).reshape(-1)  # two elements a byte
        rows_state = functional.QuantState(
            absmax=self._block_scales(
                functional, state, first // state.blocksize, -(-last // state.blocksize)
            ),
            shape=torch.Size((stop - start, in_features)),
            dtype=torch.float32,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
        )
        return functional.dequantize_4bit(packed[first // 2 : -(-last // 2)], rows_state)

    @staticmethod
    def _block_scales(functional, state, first: int, last: int) -> Tensor:
        """Block scales ``first:last`` in float32, undoing nested quantization for just those."""
        if not state.nested:
            return state.absmax[first:last].float()
        inner = state.state2.blocksize
        low = first // inner * inner
        scales = functional.dequantize_blockwise(
            state.absmax[low:last],
            absmax=state.state2.absmax[low // inner : -(-last // inner)],
            code=state.state2.code,
            blocksize=inner,
        )
        return (scales[first - low :] + state.offset).float()

    def quantize(self, linear: nn.Linear, method: str) -> nn.Module:
        bnb = self.library(f"quantize method {method!r}")
        bias = linear.bias is not None
        if method == "bnb-int8":
            quantized = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
            )
        else:
            quantized = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias,
                compute_dtype=linear.weight.dtype,
                quant_type=_FOUR_BIT[method],
            )
        quantized.load_state_dict(linear.state_dict())
        quantized = quantized.to(linear.weight.device)  # bitsandbytes quantizes on the move
        self.check(quantized)  # no CPU repacking, adapted or not (see the class docstring)
        return quantized


register_backend(BitsandbytesBackend())
