"""Quantized frozen bases (QDoRA): which libraries' Linear layers torchdora can adapt, and how.

One registry of backends, each a :class:`QuantizedBackend`: bitsandbytes (``Linear4bit`` NF4/FP4,
``Linear8bitLt``; ``pip install torchdora[bnb]``) and torchao (int8 and int4 weight-only, NF4;
``pip install torchdora[torchao]``). Nothing here imports those libraries until a quantized
module is dequantized or :func:`quantize_linear` is called.
"""

from __future__ import annotations

import torch
from torch import nn

# The built-in backends register themselves (register_backend) when their modules load.
from torchdora.quantization import ao, bnb  # noqa: F401
from torchdora.quantization.backend import CHUNK_ELEMENTS, QuantizedBackend
from torchdora.quantization.registry import (
    backend_for,
    backends,
    is_quantized_linear,
    num_weights,
    register_backend,
)

#: The ``method`` names of the built-in backends, e.g. for a ``--quantize`` flag (a registered
#: backend's methods work with :func:`quantize_linear` too).
QUANTIZATION_METHODS: tuple[str, ...] = tuple(m for b in backends() for m in b.methods)


def quantize_linear(linear: nn.Linear, method: str) -> nn.Module:
    """A quantized copy of ``linear`` (weight and bias), made by the library ``method`` names.

    ``method`` is one of :data:`QUANTIZATION_METHODS`: ``"bnb-nf4"``, ``"bnb-fp4"``,
    ``"bnb-int8"`` (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) or ``"torchao-int8"``,
    ``"torchao-int4"`` (int4, groups of 64), ``"torchao-nf4"``. ``linear`` is left unchanged.
    Raises ``ImportError`` naming the extra to install if the library is missing.
    """
    if type(linear) is not nn.Linear:
        raise TypeError(f"quantize_linear expects an nn.Linear, got {type(linear).__name__}")
    backend = next((b for b in backends() if method in b.methods), None)
    if backend is None:
        known = tuple(m for b in backends() for m in b.methods)
        raise ValueError(f"unknown quantization method {method!r}; choose one of {known}")
    return backend.quantize(linear, method)


def quantize_model(model: nn.Module, method: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Replace every plain ``nn.Linear`` of ``model`` (except those named in ``exclude`` or
    inside them) by its quantized copy, in place, as QLoRA/QDoRA do before adding adapters.

    Returns the names of the replaced modules.
    """
    skipped = tuple(f"{name}." for name in exclude)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in exclude and not name.startswith(skipped)
    ]
    for name in names:
        model.set_submodule(name, quantize_linear(model.get_submodule(name), method))
    return names


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every quantized Linear of ``model`` by a float32 ``nn.Linear`` holding its
    dequantized weight, in place (for exports that must load without the quantization
    library). Returns the names of the replaced modules."""
    names = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in names:
        module = model.get_submodule(name)
        weight = backend_for(module).dequantize(module)
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        model.set_submodule(name, linear.to(weight.device).requires_grad_(False))
    return names


__all__ = [
    "CHUNK_ELEMENTS",
    "QUANTIZATION_METHODS",
    "QuantizedBackend",
    "backend_for",
    "backends",
    "dequantize_model",
    "is_quantized_linear",
    "num_weights",
    "quantize_linear",
    "quantize_model",
    "register_backend",
]
