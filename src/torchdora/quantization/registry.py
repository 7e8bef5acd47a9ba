"""The quantization libraries torchdora can adapt, each registered by its backend module.

A new library is supported by a :class:`~torchdora.quantization.backend.QuantizedBackend`
subclass and one :func:`register_backend` call; nothing else in torchdora changes.
"""

from __future__ import annotations

from torch import Tensor, nn

from torchdora.quantization.backend import QuantizedBackend

_BACKENDS: list[QuantizedBackend] = []


def register_backend(backend: QuantizedBackend) -> QuantizedBackend:
    """Make torchdora adapt (QDoRA), count, dequantize and quantize with ``backend``'s library.

    Registered backends are asked before the earlier ones. Returns ``backend``.
    """
    if not isinstance(backend, QuantizedBackend):
        raise TypeError(
            f"register_backend expects a QuantizedBackend, got {type(backend).__name__}"
        )
    _BACKENDS.insert(0, backend)
    return backend


def backends() -> tuple[QuantizedBackend, ...]:
    """The registered backends, the most recently registered first."""
    return tuple(_BACKENDS)


def backend_for(module: nn.Module) -> QuantizedBackend | None:
    """The backend whose quantized Linear ``module`` is, or ``None`` (by names; imports nothing)."""
    return next((backend for backend in _BACKENDS if backend.owns(module)), None)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized Linear that :class:`QuantizedDoRALinear` can adapt."""
    return backend_for(module) is not None


def num_weights(param: Tensor) -> int:
    """The weights ``param`` stands for: its elements, or what a backend says its packed
    storage holds (a 4-bit weight packs two a byte)."""
    counts = (backend.num_weights(param) for backend in _BACKENDS)
    return next((count for count in counts if count is not None), param.numel())
