"""Mixed precision: ``autocast`` for bf16 (CPU and CUDA) or fp16 (CUDA, with loss scaling).

DoRA layers keep their norm and magnitude in float32 under autocast, so only the big
matmuls run in the low-precision dtype.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` checked against ``device``, with ``"auto"`` made concrete.

    ``"auto"`` is bf16 on a CUDA device that supports it (else fp16) and on a CPU with native
    bf16 instructions (AVX512-BF16 or AMX), else fp32: without them, bf16 matmuls on a CPU
    take a slow path and cost more than fp32 ones.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    if device_type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            raise ValueError("this CUDA device has no bf16 support; use precision='fp16'")
    elif precision == "fp16":
        raise ValueError(f"fp16 training needs a CUDA device; use 'bf16' on {device_type}")
    elif precision == "auto":
        return "bf16" if device_type == "cpu" and _cpu_has_native_bf16() else "fp32"
    return precision


def _cpu_has_native_bf16() -> bool:
    # torch.cpu's feature probes are private; treat their absence as "no".
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``, or a no-op context for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has fp32's range and needs none)."""
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)
