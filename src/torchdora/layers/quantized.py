"""QDoRA: DoRA on a quantized, frozen Linear base (bitsandbytes or torchao), float32 adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_RANK
from torchdora.layers.adapter import DoRAAdapter
from torchdora.layers.base import DoRALayer
from torchdora.quantization import CHUNK_ELEMENTS, backend_for, backends


class QuantizedDoRALinear(DoRALayer):
    """``y = (m / ‖Ŵ + s·B A‖) ⊙ (Ŵ x + s·B A x) + b`` over a quantized Linear with weight ``Ŵ``.

    ``Ŵ`` is the base's dequantized weight, never held whole: ``Ŵ x`` (and ``Ŵ Aᵀ`` when the
    base's kernel is linear in its input) come from the library's own kernel on the stacked
    input ``[x; A]``; ``‖Ŵ_i‖²`` is computed once by dequantizing a few rows at a time and
    cached (recomputed if the quantized weight is replaced). ``A``, ``B`` and the magnitude are
    float32 whatever the base computes in, and the output has the input's dtype.

    The base is frozen (bitsandbytes and torchao leave its bias, sometimes its weight,
    trainable), and it cannot be merged in place: :meth:`merge_and_unload` returns a new float
    ``nn.Linear`` instead. Backend details (e.g. bitsandbytes' CPU repacking, switched off) are
    in :mod:`torchdora.quantization`.

    Args:
        base_layer: a quantized Linear (see :func:`torchdora.quantization.is_quantized_linear`),
            kept by reference.
        rank, alpha: ``r`` and the scale numerator, ``s = alpha / r``.
        max_chunk_elements: elements of ``Ŵ`` dequantized at a time; bounds the memory of
            computing ``‖Ŵ_i‖²`` and, for kernels that quantize their input too, ``Ŵ Aᵀ``.
        **options: the adapter options of :class:`~torchdora.layers.base.DoRALayer`
            (``dropout``, ``use_rslora``, ``use_dora``, ``detach_norm``, ``eps``, ``init``).
            ``freeze_base`` is accepted for a uniform factory signature and ignored: a
            quantized base is always frozen.

    Shapes:
        ``forward``: ``(..., in_features)`` → ``(..., out_features)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        *,
        max_chunk_elements: int = CHUNK_ELEMENTS,
        **options,
    ) -> None:
        backend = backend_for(base_layer)
        if backend is None:
            names = ", ".join(known.name for known in backends())
            raise TypeError(
                f"QuantizedDoRALinear expects a quantized Linear layer of {names}, "
                f"got {type(base_layer).__name__}; use DoRALinear for a float nn.Linear"
            )
        options["freeze_base"] = True  # a quantized weight cannot be trained
        if max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
        backend.check(base_layer)
        self.backend = backend
        self.max_chunk_elements = max_chunk_elements
        out_features, in_features = backend.shape(base_layer)
        super().__init__(base_layer, in_features, out_features, rank=rank, alpha=alpha, **options)

    @classmethod
    def from_module(cls, module: nn.Module, **adapter_kwargs) -> QuantizedDoRALinear:
        """Wrap the quantized Linear ``module`` (not copied); the result starts equal to it."""
        return cls(module, **adapter_kwargs)

    # ----------------------------------------------------------------- the quantized weight
    @property
    def base_weight(self) -> Tensor:
        """The tensor holding the base's packed quantized weight; the norm caches key on it."""
        return self.backend.storage(self.base_layer)

    @property
    def base_dtype(self) -> torch.dtype:
        return self.backend.compute_dtype(self.base_layer)

    def weight_matrix(self, weight: Tensor | None = None) -> Tensor:
        """The dequantized weight ``Ŵ`` in float32: a full-size copy (merging, analysis)."""
        return self.backend.dequantize(self.base_layer) if weight is None else weight

    def compute_weight_sq_norm(self) -> Tensor:
        return self.backend.row_sq_norm(self.base_layer, self.max_chunk_elements)

    def compute_weight_a(self, adapter: DoRAAdapter | None = None) -> Tensor:
        lora_A = (adapter or self.get_adapter()).lora_A
        return self.backend.weight_times(self.base_layer, lora_A, self.max_chunk_elements)

    # ----------------------------------------------------------------- merging
    def merge(self, adapter_name: str | None = None) -> None:
        """Refused: ``W'`` is not representable in the base's quantized format (requantizing
        it would change the outputs), so there is no in-place merge to undo later."""
        raise RuntimeError(
            f"cannot merge into a quantized {self.backend.name} {type(self.base_layer).__name__} "
            "in place: W' does not fit its quantized format. merge_and_unload() replaces the "
            "layer by a float nn.Linear holding W' (save_merged writes such a copy)"
        )

    def merge_and_unload(
        self, adapter_name: str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Linear:
        """A new ``nn.Linear`` holding ``W' = (m/n)·(Ŵ + s·B A)`` (of ``adapter_name``, default:
        the active adapter) and the base's bias.

        ``W'`` is built from the dequantized weight in float32 and is not quantized again: the
        result is full-size, in ``dtype`` (default: the dtype the base computes in). Its weight
        is frozen and its bias trains if the base's did. This layer and its base are unchanged.
        """
        a = self.get_adapter(adapter_name)
        with torch.no_grad():
            merged, _ = DF.merge_weight(
                self.weight_matrix(),
                a.lora_A,
                a.lora_B,
                a.magnitude,
                a.scaling,
                a.eps,
                normalize=a.normalize,
            )
            bias = self.bias
            linear = nn.Linear(
                self.in_features,
                self.out_features,
                bias=bias is not None,
                device=merged.device,
                dtype=dtype or self.base_dtype,
            )
            linear.weight.copy_(merged)
            linear.weight.requires_grad_(False)
            if bias is not None:
                linear.bias.copy_(bias)
                linear.bias.requires_grad_(bias.requires_grad)
        return linear

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_features(x)
        self._check_dtype(x, match_base=False)  # any float dtype: the output has the input's
        if self.row_adapters is not None:
            return self._forward_rows(x)
        a = self._computing_adapter()
        if a is None:
            return self._base(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        lora_input = self._lora_input(x, a)
        lora_x = x2d if lora_input is None else lora_input.reshape(-1, self.in_features)
        if not a.use_dora:
            out = DF.add_lora(self._base(x2d), lora_x, a.lora_A, a.lora_B, a.scaling)
            return out.reshape(*lead, self.out_features)
        if torch.is_grad_enabled():
            if a.normalize:
                biased, weight_a = self._base_and_weight_a(x2d, a)
            else:  # the norm is the base's own: no W Aᵀ
                biased, weight_a = self._base(x2d), None
            scale = self.magnitude_scale(a, weight_a)
        else:
            biased, scale = self._base(x2d), self.inference_scale(a)
        direction = DF.add_lora(biased, lora_x, a.lora_A, a.lora_B, a.scaling)
        scale = scale.to(DF.scale_dtype(direction.dtype))
        # (W x + b + sBAx)·scale + b·(1 - scale): the base's bias stays in, one pass fewer.
        bias = None if self.bias is None else self.bias.to(scale.dtype)
        out = DF.rescale(direction, scale, None if bias is None else bias - bias * scale)
        return out.reshape(*lead, self.out_features)

    def _base(self, x: Tensor) -> Tensor:
        """The quantized base on ``x``, in ``x``'s dtype whatever the library computes in."""
        return self.backend.run(self.base_layer, x)

    def _rows_base(self, x: Tensor) -> Tensor:
        return self._unbiased(self._base(x))

    def _rows_low_rank(self, x: Tensor, adapter: DoRAAdapter) -> Tensor:
        return F.linear(F.linear(x, adapter.lora_A.to(x.dtype)), adapter.lora_B.to(x.dtype))

    def _unbiased(self, out: Tensor) -> Tensor:
        return out if self.bias is None else out - self.bias.to(out.dtype)

    def _base_and_weight_a(self, x2d: Tensor, adapter: DoRAAdapter) -> tuple[Tensor, Tensor]:
        """``(Ŵ x + b, Ŵ Aᵀ)``: both through the kernel where it is linear in its input.

        As in :func:`torchdora.functional.base_and_weight_a`, one call runs on the stacked
        ``[x; A]`` when ``x`` needs a gradient; otherwise ``x`` and ``A`` run separately.
        """
        if not self.backend.is_linear_in_input(self.base_layer):
            return self._base(x2d), self.compute_weight_a(adapter)
        lora_A = adapter.lora_A.to(x2d.dtype)
        if x2d.requires_grad:
            out = self._base(torch.cat([x2d, lora_A]))
            return out[: x2d.shape[0]], self._unbiased(out[x2d.shape[0] :]).T
        return self._base(x2d), self._unbiased(self._base(lora_A)).T
