"""What every DoRA layer kind shares: named adapters on one frozen base, the cached weight norm,
initialisation from the base weight, merge bookkeeping, and access to the active adapter.

A layer kind (Linear, Conv, Embedding, …) subclasses :class:`DoRALayer` and supplies
``forward`` and, where its weight is not already laid out as d_out × fan_in,
:meth:`DoRALayer.weight_matrix` (and :meth:`DoRALayer.store_weight_matrix` if that is not a view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_EPS, DEFAULT_RANK
from torchdora.distributed import full_tensor, is_dtensor, local_tensor
from torchdora.layers.access import AdapterAccess
from torchdora.layers.adapter import DoRAAdapter, check_adapter_name
from torchdora.layers.cache import TensorCache, forget_in_backward, holds_gradient
from torchdora.layers.initialization import AdapterInitialization
from torchdora.layers.merging import AdapterMerging
from torchdora.layers.rows import RowAdapters, forward_rows


@dataclass(frozen=True)
class PeftTensor:
    """Where one adapter parameter lives in PEFT's adapter file: key suffix and shape."""

    suffix: str
    shape: tuple[int, ...]


#: Attributes of the active adapter that a layer reads and writes as its own.
ADAPTER_ATTRIBUTES = (
    "lora_A", "lora_B", "magnitude", "lora_dropout", "rank", "alpha", "scaling", "use_rslora",
    "use_dora", "detach_norm", "normalize", "eps", "init",
)  # fmt: skip


def _delegate(name: str) -> property:
    """A read-only property reading ``name`` of the active adapter (writes: ``__setattr__``)."""

    def read(self: DoRALayer):
        return getattr(self.get_adapter(), name)

    return property(read, doc=f"The active adapter's ``{name}``.")


class DoRALayer(AdapterInitialization, AdapterMerging, AdapterAccess, nn.Module):
    """Base of the DoRA layer kinds: a frozen ``base_layer`` and named adapters (``A``, ``B``, m).

    The weight is viewed as a matrix ``W`` of shape ``(out_features, in_features)`` whose
    rows are the units the magnitude scales (output rows for Linear, output channels for
    convolutions). Then ``W' = (m / ‖W + s·B A‖) · (W + s·B A)`` row-wise, with the ``A``, ``B``,
    ``m`` of the active adapter (``self.active_adapter``; further adapters come from
    :meth:`add_adapter`). ``layer.lora_A``, ``layer.rank`` … are the active adapter's.

    Args:
        base_layer: the module being adapted; kept (not copied) as ``self.base_layer``.
        in_features: fan-in of one row of ``W``.
        out_features: number of rows of ``W`` (length of the magnitude).
        rank: ``r``, the rank of ``B A``.
        alpha: scale numerator; ``None`` means ``alpha = rank``.
        dropout: dropout probability on the low-rank branch's input.
        use_rslora: ``s = alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: ``False`` gives plain LoRA (no magnitude, no normalisation).
        detach_norm: treat the row norm as a constant in backward (paper §4.3, PEFT).
        freeze_base: set ``requires_grad=False`` on the base layer's parameters.
        normalize: ``False`` divides by the frozen base's row norms ``‖W‖`` instead of
            ``‖W + s·B A‖`` (the "no norm" ablation, see :class:`~torchdora.DoRAConfig`).
        eps: floor of the row norm.
        init: ``"default"``: ``A`` Kaiming-uniform (a=√5), as LoRA and PEFT do;
            ``"gaussian"``: ``A ~ N(0, 1/r²)`` (PEFT's ``"gaussian"``). ``B = 0`` either way.
        adapter_name: the name of this first adapter (PEFT's ``"default"``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        *,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float = DEFAULT_DROPOUT,
        use_rslora: bool = False,
        use_dora: bool = True,
        detach_norm: bool = False,
        freeze_base: bool = True,
        eps: float = DEFAULT_EPS,
        init: str = "default",
        adapter_name: str = "default",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.adapters = nn.ModuleDict()
        self.active_adapter = check_adapter_name(adapter_name)
        self.merged_adapter: str | None = None
        self.disabled = False
        self.row_adapters: RowAdapters | None = None  # set by torchdora.mixed_batch
        self._weight_sq_norm = TensorCache()
        self._merge_norm: Tensor | None = None
        if freeze_base:
            base_layer.requires_grad_(False)
        self.add_adapter(
            adapter_name, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            use_dora=use_dora, detach_norm=detach_norm, eps=eps, init=init, normalize=normalize,
        )  # fmt: skip

    # ----------------------------------------------------------------- adapters by name
    def add_adapter(
        self,
        name: str,
        *,
        rank: int = DEFAULT_RANK,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float = DEFAULT_DROPOUT,
        use_rslora: bool = False,
        use_dora: bool = True,
        detach_norm: bool = False,
        eps: float = DEFAULT_EPS,
        init: str = "default",
        normalize: bool = True,
    ) -> DoRAAdapter:
        """Add a new adapter ``name``, initialised so that it computes what the base does.

        The active adapter stays what it was (PEFT's ``add_adapter`` does the same); its own
        settings are independent of the other adapters'. A merged layer refuses (unmerge first).
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if self.merged:
            raise RuntimeError(
                f"cannot add an adapter while {self.merged_adapter!r} is merged; unmerge() first"
            )
        dtype = self.base_dtype
        adapter = DoRAAdapter(
            self.in_features,
            self.out_features,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            use_dora=use_dora,
            detach_norm=detach_norm,
            eps=eps,
            init=init,
            normalize=normalize,
            factor_dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
            magnitude_dtype=DF.norm_dtype(dtype),
            device=local_tensor(self.base_weight).device,
        )
        self.adapters[name] = adapter.train(self.training)
        self.reset_parameters(name)
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (a merged one is unmerged first). The active name is left as
        it is; a layer whose active adapter is gone computes its base layer alone."""
        self.get_adapter(name)
        if self.merged_adapter == name:
            self.unmerge()
        del self.adapters[name]

    @property
    def adapter_names(self) -> list[str]:
        """The names of this layer's adapters, in the order they were added."""
        return list(self.adapters)

    def get_adapter(self, name: str | None = None) -> DoRAAdapter:
        """The adapter ``name`` (default: the active one); a ``KeyError`` lists the known ones."""
        name = self.active_adapter if name is None else name
        if name not in self.adapters:
            raise KeyError(
                f"this {type(self).__name__} has no adapter {name!r}; its adapters: "
                f"{self.adapter_names}"
            )
        return self.adapters[name]

    def __setattr__(self, name: str, value) -> None:
        if name in ADAPTER_ATTRIBUTES:  # `layer.detach_norm = True` sets the active adapter's
            setattr(self.get_adapter(), name, value)
        else:
            super().__setattr__(name, value)

    lora_A = _delegate("lora_A")
    lora_B = _delegate("lora_B")
    magnitude = _delegate("magnitude")
    lora_dropout = _delegate("lora_dropout")
    rank = _delegate("rank")
    alpha = _delegate("alpha")
    scaling = _delegate("scaling")
    use_rslora = _delegate("use_rslora")
    use_dora = _delegate("use_dora")
    detach_norm = _delegate("detach_norm")
    normalize = _delegate("normalize")
    eps = _delegate("eps")
    init = _delegate("init")

    @property
    def merged(self) -> bool:
        """Whether an adapter (``merged_adapter``) is merged into the base weight."""
        return self.merged_adapter is not None

    # ----------------------------------------------------------------- PEFT's file layout
    #: PEFT's key suffixes of ``A`` and ``B`` for this kind (an Embedding's differ)
    PEFT_FACTOR_KEYS = ("lora_A.weight", "lora_B.weight")
    #: PEFT's ``fan_in_fan_out``: the base stores ``Wᵀ`` (``transformers``' ``Conv1D``)
    fan_in_fan_out = False

    def peft_shapes(self, adapter: DoRAAdapter) -> dict[str, tuple[int, ...]]:
        """The shapes PEFT stores ``lora_A``, ``lora_B``, ``magnitude`` in (a convolution's are
        conv kernels); ``ValueError`` if PEFT's format cannot express this layer."""
        r, out = adapter.rank, self.out_features
        return {"lora_A": (r, self.in_features), "lora_B": (out, r), "magnitude": (out,)}

    def peft_layout(self, adapter_name: str | None = None) -> dict[str, PeftTensor]:
        """Our parameter name → its PEFT key suffix and shape, for one adapter of this layer."""
        adapter = self.get_adapter(adapter_name)
        shapes = self.peft_shapes(adapter)
        a, b = self.PEFT_FACTOR_KEYS
        layout = {
            "lora_A": PeftTensor(a, shapes["lora_A"]),
            "lora_B": PeftTensor(b, shapes["lora_B"]),
        }
        if adapter.use_dora:
            layout["magnitude"] = PeftTensor("lora_magnitude_vector", shapes["magnitude"])
        return layout

    # ----------------------------------------------------------------- the base weight
    @property
    def base_weight(self) -> Tensor:
        """The base weight in the layout this layer's forward computes with.

        The base layer's ``weight`` parameter itself, except where a kind computes with another
        view of it (``transformers``' ``Conv1D`` stores ``Wᵀ``: its kind returns the ``W`` view).
        """
        return self.base_layer.weight

    @property
    def weight(self) -> Tensor:
        """The base layer's ``weight``, so code that reads ``module.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's ``bias`` (or ``None``)."""
        return getattr(self.base_layer, "bias", None)

    @property
    def base_dtype(self) -> torch.dtype:
        """The floating dtype the base computes in (a quantized base overrides this)."""
        return self.base_weight.dtype

    def weight_matrix(self, weight: Tensor | None = None) -> Tensor:
        """``weight`` (default: the base weight) viewed as ``(out_features, in_features)``.

        Kinds with another layout override this; where the result is not a view of the base
        weight they also override :meth:`store_weight_matrix`.
        """
        return self.base_weight if weight is None else weight

    def store_weight_matrix(self, matrix: Tensor) -> None:
        """Write an ``(out_features, in_features)`` matrix into the base weight (merging)."""
        self.weight_matrix().copy_(matrix)

    def weight_sq_norm(self) -> Tensor:
        """``c_i = ‖W_i‖²``, cached while the base weight is unchanged.

        A trainable base is never cached: ``c`` is recomputed differentiably each call. For a
        sharded base (a ``DTensor``) each rank computes its part and the result is gathered, so
        every rank must call this together; see :meth:`_cacheable` for FSDP2's gathered copies and
        ``torch.compile``, under which ``c`` is computed in the graph on every call.

        """
        weight = self.base_weight
        if weight.requires_grad and torch.is_grad_enabled():
            return self.compute_weight_sq_norm()

        def compute() -> Tensor:
            with torch.no_grad():
                return full_tensor(self.compute_weight_sq_norm())

        return self._weight_sq_norm.get([weight], None, compute, self._cacheable(weight))

    def _cacheable(self, tensor: Tensor) -> bool:
        """Whether a norm computed from ``tensor`` may be cached (keyed by a
        :class:`~torchdora.layers.cache.Stamp`).

        A ``DTensor`` is keyed on its local shard. Inside the forward of a module that FSDP2
        manages, the parameters are gathered copies that FSDP refills in freshly allocated
        storage on every forward with their version counter kept unchanged, so neither the
        storage nor the version says whether the shards changed in between: a norm computed
        from such a copy is never cached. Nor is one computed under ``torch.compile``: checking
        a cache in Python would break the graph, so a compiled forward computes the norms in its
        graph on every call (one more read of ``W``).
        """
        if torch.compiler.is_compiling():
            return False
        if is_dtensor(tensor):
            if not all(is_dtensor(a.lora_A) for a in self.adapters.values()):
                raise RuntimeError(
                    f"the base weight of this {type(self).__name__} is sharded (a DTensor) but "
                    "its adapter is not: the base layer was given to fully_shard on its own. "
                    "DoRA reads the base weight directly, so FSDP never gathers it; shard the "
                    "DoRA layer together with its base (fully_shard the DoRA layer or a module "
                    "holding it, e.g. the transformer block), never base_layer alone"
                )
            return True
        return not self.__dict__.get("_is_fsdp_managed_module", False)  # set by fully_shard

    def compute_weight_sq_norm(self) -> Tensor:
        """``‖W_i‖²`` computed afresh (a quantized base overrides this to dequantize in chunks)."""
        return DF.weight_sq_row_norm(self.weight_matrix())

    def compute_weight_a(self, adapter: DoRAAdapter | None = None) -> Tensor:
        """``P = W Aᵀ`` of shape ``(out_features, rank)`` with one extra pass over ``W``.

        The Linear training path gets ``P`` for free from its stacked matmul instead.
        """
        weight, lora_A = self.weight_matrix(), (adapter or self.get_adapter()).lora_A
        return torch.nn.functional.linear(lora_A.to(weight.dtype), weight).T

    def refresh_weight_norm(self) -> None:
        """Forget cached norms; only needed after editing the base weight through ``.data``."""
        self._weight_sq_norm.clear()
        for adapter in self.adapters.values():
            adapter.scale_cache.clear()

    def row_norm(
        self, adapter: DoRAAdapter | None = None, weight_a: Tensor | None = None
    ) -> Tensor:
        """The norm an adapter's magnitude is divided by, per row: ``n = ‖W + s·B A‖`` in the
        factored form from ``weight_a = W Aᵀ`` (computed if not given), or for
        ``normalize=False`` the frozen base's ``‖W‖`` (a constant)."""
        a = adapter or self.get_adapter()
        c = self.weight_sq_norm()
        if not a.normalize:
            return c.detach().clamp_min(a.eps * a.eps).sqrt()
        weight_a = self.compute_weight_a(a) if weight_a is None else weight_a
        norm = DF.factored_row_norm(c, weight_a, a.lora_A, a.lora_B, a.scaling, a.eps)
        return norm.detach() if a.detach_norm else norm

    def inference_scale(self, adapter: DoRAAdapter | None = None) -> Tensor:
        """``m / n`` for no-grad forwards, cached until any of W, A, B, m changes."""
        a = adapter or self.get_adapter()
        tensors = (self.base_weight, a.lora_A, a.lora_B, a.magnitude)

        def compute() -> Tensor:
            self._check_initialized(a)
            with torch.no_grad():
                norm = self.row_norm(a)
                return a.magnitude.to(norm.dtype) / norm

        cacheable = all(self._cacheable(t) for t in tensors) and not holds_gradient(tensors[1:])
        return a.scale_cache.get(tensors, (a.scaling, a.eps, a.normalize), compute, cacheable)

    def magnitude_scale(
        self, adapter: DoRAAdapter | None = None, weight_a: Tensor | None = None
    ) -> Tensor:
        """``m / n`` per row, with ``P = W Aᵀ`` from :meth:`compute_weight_a` unless given.

        Without autograd this is the cached :meth:`inference_scale`; with it, the backward
        through the result forgets that cache (:func:`~torchdora.layers.cache.forget_in_backward`).
        """
        a = adapter or self.get_adapter()
        if not torch.is_grad_enabled():
            return self.inference_scale(a)
        norm = self.row_norm(a, weight_a)
        scale = a.magnitude.to(norm.dtype) / norm
        forget_in_backward(a.scale_cache, scale)
        return scale

    # ----------------------------------------------------------------- helpers for forward
    #: how a per-row scale ``(d_out,)`` broadcasts against this kind's output
    _scale_shape: tuple[int, ...] = (-1,)

    def _rows_bias(self) -> Tensor | None:
        """The bias as it broadcasts against this kind's output (mixed batches)."""
        return self.bias

    def _forward_rows(self, x: Tensor) -> Tensor | None:
        """The output of a mixed-adapter batch (see :mod:`torchdora.layers.rows`), or ``None``
        outside :func:`torchdora.mixed_batch`."""
        return None if self.row_adapters is None else forward_rows(self, x, self.row_adapters)

    def _check_features(self, x: Tensor) -> None:
        """Refuse an input that is not ``(..., in_features)`` (kinds with a Linear-like input)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )

    def _check_dtype(self, x: Tensor, *, match_base: bool = True) -> None:
        """Refuse an input the forward cannot compute with, naming its dtype (metadata only).

        The input must be floating point and, with ``match_base``, in the dtype the base
        computes in, as for ``nn.Linear`` (mixing dtypes would otherwise cast the whole base
        weight on the autograd path and fail on the no-grad one). Under autocast, which casts
        every floating dtype but float64, the two may differ unless one is float64.
        """
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        base = self.base_dtype
        if not match_base or x.dtype == base:
            return
        if not DF.autocast_enabled(x) or torch.float64 in (x.dtype, base):
            raise TypeError(
                f"{type(self).__name__} computes in {base} (its base layer's dtype) but got "
                f"input of dtype {x.dtype}; cast the input or the layer (.to(dtype)), or run "
                "under torch.autocast (which leaves float64 as it is)"
            )

    def _computing_adapter(self) -> DoRAAdapter | None:
        """The adapter this forward computes with, or ``None`` to run the base layer alone
        (disabled, merged, or no adapter of the active name on this layer)."""
        if self.disabled and self.merged:
            raise RuntimeError(
                "the adapter is merged into the base weight; unmerge() before disabling it"
            )
        if self.disabled or self.merged or self.active_adapter not in self.adapters:
            return None
        adapter = self.adapters[self.active_adapter]
        self._check_initialized(adapter)
        return adapter

    def _lora_input(self, x: Tensor, adapter: DoRAAdapter) -> Tensor | None:
        """The low-rank branch's input when dropout changes it, else ``None`` (reuse ``x``)."""
        if isinstance(adapter.lora_dropout, nn.Identity) or not self.training:
            return None
        return adapter.lora_dropout(x)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}"
        text += f", active_adapter={self.active_adapter!r}"
        return text + (f", merged_adapter={self.merged_adapter!r}" if self.merged else "")
