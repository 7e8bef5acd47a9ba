"""What torchdora needs from a quantization library, and the chunked maths built on it.

A QDoRA layer never holds its frozen weight ``W`` in float. It runs the base through the
library's own kernel and needs only two things from ``W`` itself (DESIGN.md §1.1, §1.4):
``c = ‖W_i‖²`` (once, cached) and, where the kernel cannot give it, ``P = W Aᵀ``. Both come
from dequantizing ``W`` a block of rows at a time, so peak memory stays at one chunk.

Backends recognise modules by class and module *names* and import their library only when
they must touch its API (dequantizing, quantizing): importing a library has side effects
(bitsandbytes, for one, pulls in much of ``torch._dynamo`` and registers CPU kernels), and a
model without such layers should not pay for them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor, nn

#: Elements of ``W`` dequantized at a time by default: 4 Mi, i.e. 16 MiB in float32.
CHUNK_ELEMENTS = 1 << 22


def require(package: str, extra: str, purpose: str) -> ModuleType:
    """Import ``package``, or raise an ``ImportError`` naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the {package!r} package, which is not installed; "
            f"install it with `pip install torchdora[{extra}]`"
        ) from error


def defined_in(obj: object, package: str) -> bool:
    """Whether ``obj``'s class, or a class it derives from, is defined in ``package``."""
    return any(
        cls.__module__ == package or cls.__module__.startswith(package + ".")
        for cls in type(obj).__mro__
    )


class QuantizedBackend(ABC):
    """How torchdora talks to one quantization library's Linear layers.

    Subclasses say how to recognise, check, describe and dequantize a module; the chunked
    ``‖W_i‖²``, ``W aᵀ`` and full dequantization are built here from :meth:`dequantize_rows`.
    """

    #: the library as users know it, e.g. ``"bitsandbytes"``
    name: str
    #: its import name
    package: str
    #: torchdora's optional dependency that installs it (``pip install torchdora[extra]``)
    extra: str
    #: the ``method`` names :meth:`quantize` accepts
    methods: tuple[str, ...]

    # ----------------------------------------------------------------- per library
    @abstractmethod
    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is a quantized Linear of this library (by names; imports nothing)."""

    @abstractmethod
    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if ``module`` cannot serve as a frozen QDoRA base as it is.

        May also switch off library behaviours that would rewrite the quantized weight
        behind the layer's back (documented per backend).
        """

    @abstractmethod
    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(out_features, in_features)`` of the module's weight."""

    @abstractmethod
    def storage(self, module: nn.Module) -> Tensor:
        """A plain tensor holding the packed weight: replaced or bumped when the weight changes."""

    @abstractmethod
    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The floating dtype the module computes in."""

    @abstractmethod
    def dequantize_rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the dequantized weight, float32, ``(stop - start, in_features)``.

        ``start`` is a multiple of :meth:`chunk_rows`.
        """

    @abstractmethod
    def quantize(self, linear: nn.Linear, method: str) -> nn.Module:
        """A new quantized module holding ``linear``'s weight and bias (``linear`` is unchanged)."""

    def num_weights(self, param: Tensor) -> int | None:
        """How many weights ``param`` holds if it is this library's packed weight, else ``None``."""
        return None

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype the module's forward needs its input in, or ``None`` if it casts itself."""
        return None

    def run(self, module: nn.Module, x: Tensor) -> Tensor:
        """The module on ``x``, in ``x``'s dtype whatever the library computes in."""
        dtype = self.input_dtype(module)
        return module(x if dtype is None else x.to(dtype)).to(x.dtype)

    def is_linear_in_input(self, module: nn.Module) -> bool:
        """Whether ``module(x) = x Ŵᵀ + b`` (Ŵ the dequantized weight) up to rounding.

        ``False`` where the kernel also quantizes its input; ``P = W Aᵀ`` then comes from the
        dequantized weight instead of the kernel.
        """
        return True

    def row_alignment(self, module: nn.Module) -> int:
        """Chunks must start at multiples of this many rows (the quantization blocks' period)."""
        return 1

    def chunk_rows(self, module: nn.Module, max_elements: int) -> int:
        """Rows per dequantized chunk: at most ``max_elements`` elements where alignment allows."""
        align = self.row_alignment(module)
        wanted = max_elements // self.shape(module)[1]
        return max(align, wanted // align * align)

    def library(self, purpose: str) -> ModuleType:
        """The library itself, imported now (with an error naming the extra if it is missing)."""
        return require(self.package, self.extra, purpose)

    # ----------------------------------------------------------------- built on dequantize_rows
    def chunks(
        self, module: nn.Module, max_elements: int = CHUNK_ELEMENTS
    ) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows)`` over the dequantized float32 weight, one chunk alive at a time."""
        out_features = self.shape(module)[0]
        step = self.chunk_rows(module, max_elements)
        for start in range(0, out_features, step):
            yield start, self.dequantize_rows(module, start, min(start + step, out_features))

    @torch.no_grad()
    def row_sq_norm(self, module: nn.Module, max_elements: int = CHUNK_ELEMENTS) -> Tensor:
        """``c_i = ‖W_i‖²`` of the dequantized weight, float32, ``(out_features,)``."""
        return torch.cat(
            [rows.square().sum(dim=1) for _, rows in self.chunks(module, max_elements)]
        )

    def weight_times(
        self, module: nn.Module, a: Tensor, max_elements: int = CHUNK_ELEMENTS
    ) -> Tensor:
        """``W aᵀ`` (``(out_features, k)`` for ``a`` of shape ``(k, in_features)``), float32.

        Differentiable in ``a``; backward dequantizes again in chunks rather than keeping ``W``.
        """
        return _WeightTimes.apply(a, self, module, max_elements)

    @torch.no_grad()
    def dequantize(self, module: nn.Module) -> Tensor:
        """The whole dequantized weight, float32 (merging only: this is the full d_out × d_in)."""
        return torch.cat([rows for _, rows in self.chunks(module)])


class _WeightTimes(torch.autograd.Function):
    """``P = W aᵀ`` from dequantized row chunks, with ``∂L/∂a = (∂L/∂P)ᵀ W`` chunk by chunk."""

    @staticmethod
    def forward(ctx, a: Tensor, backend: QuantizedBackend, module: nn.Module, max_elements: int):
        ctx.backend, ctx.module, ctx.max_elements = backend, module, max_elements
        ctx.a_dtype = a.dtype
        a32 = a.detach().float()
        return torch.cat([rows @ a32.T for _, rows in backend.chunks(module, max_elements)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.float()
        grad_a = None
        for start, rows in ctx.backend.chunks(ctx.module, ctx.max_elements):
            part = grad[start : start + rows.shape[0]].T @ rows
            grad_a = part if grad_a is None else grad_a.add_(part)
        return grad_a.to(ctx.a_dtype), None, None, None
