"""What every DoRA layer kind shares: the adapter parameters, the cached weight norm,
merge bookkeeping, and access to the adapter as a dict or a flat vector.

A layer kind (Linear, Conv, Embedding, …) subclasses :class:`DoRALayer` and supplies
``forward`` and, where its weight is not already laid out as d_out × fan_in,
:meth:`DoRALayer.weight_matrix` (and :meth:`DoRALayer.store_weight_matrix` if that is not a view).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdRef

from torchdora import functional as DF
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_EPS, DEFAULT_RANK
from torchdora.distributed import copy_full_, full_tensor, is_dtensor, local_tensor

#: the smallest norm floor whose square is a normal float32 (smaller ones floor at 0: NaN rows)
MIN_EPS = math.sqrt(torch.finfo(torch.float32).tiny)

#: Initialisations of ``A`` (``B`` always starts at 0, so every one reproduces the base layer).
LORA_INITS = ("default", "gaussian")


class _Stamp:
    """What a cached value was computed from: a tensor, its storage and its in-place version.

    The tensor (for a view, its base: ``Conv1D`` computes with ``weight.T``) and its storage are
    held by weak reference and compared by identity, never by address: a new tensor that got a
    freed one's address and version 0 (``load_state_dict(..., assign=True)``, ``param.data =
    new``) never matches. ``_version`` catches in-place edits, except through ``tensor.data``:
    after such an edit call :meth:`DoRALayer.refresh_weight_norm`. For a ``DTensor`` the storage
    and view are its local shard's, and both version counters count: an in-place op through the
    ``DTensor`` bumps only the wrapper's, one on the local shard only the shard's.
    """

    __slots__ = ("_state", "_storage", "_tensor")

    def __init__(self, t: Tensor) -> None:
        self._tensor = WeakIdRef(_owner(t))
        self._storage = StorageWeakRef(local_tensor(t).untyped_storage())
        self._state = _state(t)

    def matches(self, t: Tensor) -> bool:
        """Whether ``t`` is the same tensor, with the same contents, as when stamped."""
        return (
            self._tensor() is _owner(t)
            and _state(t) == self._state
            and local_tensor(t).untyped_storage()._cdata == self._storage.cdata
        )


def _owner(t: Tensor) -> Tensor:
    """The tensor whose identity stands for ``t``'s: ``t`` itself, or the base of a view."""
    return t if t._base is None else t._base


def _state(t: Tensor) -> tuple:
    """``t``'s in-place version and how it views its storage (the local shard's, if sharded)."""
    local = local_tensor(t)
    view = (local._version, t.dtype, local.shape, local.stride(), local.storage_offset())
    return view if local is t else (*view, t._version, t.shape, t.placements)


def check_adapter_args(
    rank: int, alpha: float | None, dropout: float, eps: float, init: str = "default"
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the first bad hyperparameter."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    numbers = {"alpha": 1.0 if alpha is None else alpha, "dropout": dropout, "eps": eps}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if alpha is not None and not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be finite and > 0 (or None for alpha = rank), got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not MIN_EPS <= eps < math.inf:
        raise ValueError(
            f"eps must be finite and >= {MIN_EPS:.3g} (the norm floor is applied to n² = eps² in "
            f"float32, where a smaller square is 0), got {eps}"
        )
    if init not in LORA_INITS:
        raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (or their local shards) share memory."""
    a, b = local_tensor(a), local_tensor(b)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class DoRALayer(nn.Module):
    """Base of the DoRA layer kinds: a frozen ``base_layer``, ``lora_A``, ``lora_B``, ``magnitude``.

    The weight is viewed as a matrix ``W`` of shape ``(out_features, in_features)`` whose
    rows are the units the magnitude scales (output rows for Linear, output channels for
    convolutions). Then ``W' = (m / ‖W + s·B A‖) · (W + s·B A)`` row-wise.

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
        eps: floor of the row norm.
        init: ``"default"``: ``A`` Kaiming-uniform (a=√5), as LoRA and PEFT do;
            ``"gaussian"``: ``A ~ N(0, 1/r²)`` (PEFT's ``"gaussian"``). ``B = 0`` either way.
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
    ) -> None:
        super().__init__()
        check_adapter_args(rank, alpha, dropout, eps, init)
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.use_dora = use_dora
        self.detach_norm = detach_norm
        self.eps = eps
        self.init = init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        if freeze_base:
            base_layer.requires_grad_(False)

        dtype, device = self.base_dtype, self.base_weight.device
        adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        factory = {"device": device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        if use_dora:
            factory["dtype"] = DF.norm_dtype(dtype)
            self.magnitude = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("magnitude", None)
        self._weight_sq_norm: Tensor | None = None
        self._weight_sq_norm_key: _Stamp | None = None
        self._scale_cache: Tensor | None = None
        self._scale_cache_key: tuple[tuple[_Stamp, ...], float, float] | None = None
        self._merge_norm: Tensor | None = None
        self._uninitialized: set[str] = set()
        self.reset_parameters()

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
        """``c_i = ‖W_i‖²``, cached while the base weight is unchanged (DESIGN.md §1.3).

        A trainable base is never cached: ``c`` is recomputed differentiably each call. For a
        sharded base (a ``DTensor``) each rank computes its part and the result is gathered, so
        every rank must call this together; see :meth:`_cacheable` for FSDP2's gathered copies and
        ``torch.compile``, under which ``c`` is computed in the graph on every call.

        Raises:
            RuntimeError: the adapter was never initialised (see :meth:`initialize_magnitude`).
        """
        weight = self.base_weight
        if weight.requires_grad and torch.is_grad_enabled():
            self._check_initialized()
            return self.compute_weight_sq_norm()
        cacheable, stamp = self._cacheable(weight), self._weight_sq_norm_key
        if cacheable and stamp is not None and stamp.matches(weight):
            return self._weight_sq_norm
        self._check_initialized()
        with torch.no_grad():
            norm = full_tensor(self.compute_weight_sq_norm())
        if cacheable:
            self._weight_sq_norm, self._weight_sq_norm_key = norm, _Stamp(weight)
        return norm

    def _cacheable(self, tensor: Tensor) -> bool:
        """Whether a norm computed from ``tensor`` may be cached (keyed by a :class:`_Stamp`).

        A ``DTensor`` is keyed on its local shard. Inside the forward of a module that FSDP2
        manages, the parameters are gathered copies that FSDP refills in freshly allocated
        storage on every forward with their version counter kept unchanged, so neither the
        storage nor the version says whether the shards changed in between: a norm computed
        from such a copy is never cached. Nor is one computed under ``torch.compile``: checking
        a cache in Python would break the graph, so a compiled forward computes the norms in its
        graph on every call (one more read of ``W``: about 3% of the frozen matmul of a
        1024 × 1024 layer at 256 tokens on CPU).
        """
        if torch.compiler.is_compiling():
            return False
        if is_dtensor(tensor):
            if not is_dtensor(self.lora_A):
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

    def compute_weight_a(self) -> Tensor:
        """``P = W Aᵀ`` of shape ``(out_features, rank)`` with one extra pass over ``W``.

        The Linear training path gets ``P`` for free from its stacked matmul instead.
        """
        weight = self.weight_matrix()
        return torch.nn.functional.linear(self.lora_A.to(weight.dtype), weight).T

    def refresh_weight_norm(self) -> None:
        """Forget cached norms; only needed after editing the base weight through ``.data``."""
        self._weight_sq_norm_key = None
        self._scale_cache_key = None

    def __getstate__(self) -> dict:
        # The caches hold weak references to this layer's tensors: a copy (deepcopy, pickle)
        # has tensors of its own and starts without them.
        state = super().__getstate__()
        state.update(_weight_sq_norm=None, _weight_sq_norm_key=None)
        state.update(_scale_cache=None, _scale_cache_key=None)
        return state

    def row_norm(self, weight_a: Tensor) -> Tensor:
        """``n = ‖W + s·B A‖`` per row, from ``weight_a = W Aᵀ`` (the factored form)."""
        norm = DF.factored_row_norm(
            self.weight_sq_norm(), weight_a, self.lora_A, self.lora_B, self.scaling, self.eps
        )
        return norm.detach() if self.detach_norm else norm

    def inference_scale(self) -> Tensor:
        """``m / n`` for no-grad forwards, cached until any of W, A, B, m changes."""
        tensors = (self.base_weight, self.lora_A, self.lora_B, self.magnitude)
        cacheable, key = all(self._cacheable(t) for t in tensors), self._scale_cache_key
        if (
            cacheable
            and key is not None
            and key[1:] == (self.scaling, self.eps)
            and all(stamp.matches(t) for stamp, t in zip(key[0], tensors, strict=True))
        ):
            return self._scale_cache
        self._check_initialized()
        with torch.no_grad():
            norm = self.row_norm(self.compute_weight_a())
            scale = self.magnitude.to(norm.dtype) / norm
        if cacheable:
            stamps = tuple(_Stamp(t) for t in tensors)
            self._scale_cache, self._scale_cache_key = scale, (stamps, self.scaling, self.eps)
        return scale

    def magnitude_scale(self) -> Tensor:
        """``m / n`` per row, with ``P = W Aᵀ`` from :meth:`compute_weight_a`.

        For kinds whose forward cannot produce ``P`` from its own pass over ``W`` (all but
        Linear). Without autograd this is the cached :meth:`inference_scale`.
        """
        if not torch.is_grad_enabled():
            return self.inference_scale()
        norm = self.row_norm(self.compute_weight_a())
        return self.magnitude.to(norm.dtype) / norm

    # ----------------------------------------------------------------- initialisation
    def reset_parameters(self) -> None:
        """Back to the initial adapter: ``A``, ``B`` by :meth:`reset_lora_factors`, ``m = ‖W_i‖``.

        The layer then reproduces its base layer exactly. A merged layer is unmerged first.
        The base layer's own parameters are left alone. On a base still on the ``meta``
        device nothing can be computed: the adapter is marked uninitialised instead (see
        :meth:`initialize_magnitude`).
        """
        if self.merged:
            self.unmerge()
        if self.base_weight.is_meta:
            self._uninitialized = set(self._adapter_names())
            return
        self._materialize_adapter()
        self._uninitialized.clear()
        with torch.no_grad():
            self._reset_lora_factors_whole()
            if self.magnitude is not None:
                copy_full_(self.magnitude, self.weight_sq_norm().sqrt())

    def initialize_magnitude(self) -> None:
        """Set ``m = ‖W + s·B A‖`` row-wise from the current base weight (``‖W‖`` for ``B = 0``).

        For deferred initialisation: a layer built while its base was on the ``meta`` device
        has no adapter values. Once the base weights are real (``to_empty`` and loaded, or
        ``load_state_dict(..., assign=True)``), this materialises adapter parameters still on
        ``meta`` on the base weight's device and, if nothing was loaded into ``A`` and ``B``,
        initialises the whole adapter as :meth:`reset_parameters` does. Otherwise it keeps
        ``A`` and ``B`` and sets the magnitude that makes the layer compute what LoRA with the
        same ``A``, ``B`` computes (PEFT's DoRA initialisation), replacing a trained magnitude.
        With sharded (FSDP2) parameters every rank must call it.

        Raises:
            RuntimeError: the base weight is still on ``meta``, or the layer is merged.
        """
        if self.base_weight.is_meta:
            raise RuntimeError(
                f"cannot initialise the magnitude of this {type(self).__name__}: its base weight "
                "is still on the meta device. Materialise the model (model.to_empty(device=...)) "
                "and load the base weights first"
            )
        if self.merged:
            raise RuntimeError("cannot initialise the magnitude of a merged layer; unmerge() first")
        if self._uninitialized & {"lora_A", "lora_B"}:
            self.reset_parameters()
            return
        self._uninitialized.clear()
        if self.magnitude is None:
            return
        with torch.no_grad():
            weight_a = full_tensor(self.compute_weight_a())
            lora_A, lora_B = full_tensor(self.lora_A), full_tensor(self.lora_B)
            norm = DF.factored_row_norm(
                self.weight_sq_norm(), weight_a, lora_A, lora_B, self.scaling, self.eps
            )
            copy_full_(self.magnitude, norm)

    @property
    def adapter_initialized(self) -> bool:
        """Whether ``A``, ``B``, ``m`` hold values (false for a layer built on ``meta``, until
        :meth:`initialize_magnitude` or a load)."""
        return not self._uninitialized

    def mark_initialized(self) -> None:
        """Declare the adapter's values set, for code that copies an adapter into the parameters.

        ``load_state_dict``, :meth:`set_adapter_state`, :meth:`set_adapter_vector`,
        :meth:`initialize_magnitude` and torchdora's adapter loading do this themselves.
        """
        self._uninitialized.clear()

    def _adapter_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B") + (("magnitude",) if self.magnitude is not None else ())

    def _check_initialized(self) -> None:
        if self._uninitialized:
            raise RuntimeError(
                f"this {type(self).__name__} has no values in {sorted(self._uninitialized)}: it "
                "was built while its base was on the meta device. Once the base weights are "
                "loaded, call torchdora.initialize_magnitude(model) to start a new adapter, or "
                "load a trained one (torchdora.io.load_adapter, or load_state_dict with its "
                "keys; after writing the values in place otherwise, call mark_initialized())"
            )

    def _materialize_adapter(self) -> None:
        """Replace adapter parameters left on ``meta`` by empty ones on the base weight's device."""
        device = local_tensor(self.base_weight).device
        for name in self._adapter_names():
            param = getattr(self, name)
            if param.is_meta:
                empty = torch.empty_like(param, device=device)
                setattr(self, name, nn.Parameter(empty, requires_grad=param.requires_grad))

    def _reset_lora_factors_whole(self) -> None:
        """:meth:`reset_lora_factors` on whole tensors when ``A``, ``B`` are sharded ``DTensor`` s.

        DTensor's own random ops on a CPU mesh give every shard the same numbers. Drawing the
        whole factor on each rank and keeping this rank's shard gives what one process with the
        same seed draws (and independent draws per shard if the ranks' seeds differ).
        """
        sharded = {n: p for n in ("lora_A", "lora_B") if is_dtensor(p := self._parameters[n])}
        whole = {
            n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.device), False)
            for n, p in sharded.items()
        }
        self._parameters.update(whole)
        try:
            self.reset_lora_factors()
        finally:
            self._parameters.update(sharded)
        for name, param in sharded.items():
            copy_full_(param, whole[name])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state dict may hand a parameter its own tensor back, which loads no values:
        # torch.distributed.checkpoint's set_model_state_dict fills the keys it was not given so.
        loaded = {
            name
            for name in self._adapter_names()
            if (value := state_dict.get(prefix + name)) is not None
            and not _same_storage(value, getattr(self, name))
        }
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._uninitialized -= loaded

    def reset_lora_factors(self) -> None:
        """``B = 0`` and ``A`` by ``self.init`` (see the class docstring), so ``B A = 0``."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # ----------------------------------------------------------------- merging
    def merge(self) -> None:
        """Write ``W'`` into the base weight; the forward then runs the base layer alone."""
        if self.merged:
            return
        self._check_initialized()
        if is_dtensor(self.base_weight):
            raise RuntimeError(
                "merging a sharded (FSDP2) layer is not supported: save the adapter "
                "(save_adapter gathers it) and merge in one process (load_adapter, then "
                "merge_and_unload)"
            )
        with torch.no_grad():
            merged, self._merge_norm = DF.merge_weight(
                self.weight_matrix(),
                self.lora_A,
                self.lora_B,
                self.magnitude,
                self.scaling,
                self.eps,
            )
            self.store_weight_matrix(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Restore the base weight ``W`` (to rounding) after :meth:`merge`."""
        if not self.merged:
            return
        with torch.no_grad():
            self.store_weight_matrix(
                DF.unmerge_weight(
                    self.weight_matrix(),
                    self.lora_A,
                    self.lora_B,
                    self.magnitude,
                    self.scaling,
                    self._merge_norm,
                )
            )
        self._merge_norm = None
        self.merged = False

    def merge_and_unload(self) -> nn.Module:
        """Merge in place and return the base layer, now a plain module holding ``W'``."""
        self.merge()
        return self.base_layer

    # ----------------------------------------------------------------- parameter access
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this adapter trains or owns, by name, in a fixed order.

        ``lora_A``, ``lora_B``, ``magnitude`` (DoRA only), then the base layer's parameters
        if it is not frozen.
        """
        params = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.magnitude is not None:
            params["magnitude"] = self.magnitude
        for name, param in self.base_layer.named_parameters():
            if param.requires_grad:
                params[f"base_layer.{name}"] = param
        return params

    def num_trainable_parameters(self) -> int:
        """Elements of the parameters with ``requires_grad`` (the adapter; the base if unfrozen)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def get_adapter_state(self) -> dict[str, Tensor]:
        """A copy of :meth:`adapter_parameters` as plain, whole tensors (gathered if sharded)."""
        return {
            name: full_tensor(p).detach().clone() for name, p in self.adapter_parameters().items()
        }

    def set_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Copy tensors into :meth:`adapter_parameters`; keys and shapes must match exactly."""
        params = self.adapter_parameters()
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(
                f"adapter state keys differ: missing {missing}, unexpected {unexpected}"
            )
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"adapter state {name!r} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(param.shape)}"
                )
        for name, param in params.items():
            copy_full_(param, state[name])
        self.mark_initialized()

    def get_adapter_vector(self) -> Tensor:
        """All of :meth:`adapter_parameters` flattened into one vector, in their order."""
        params = self.adapter_parameters().values()
        return torch.cat([full_tensor(p).detach().reshape(-1) for p in params])

    def set_adapter_vector(self, vector: Tensor) -> None:
        """Inverse of :meth:`get_adapter_vector`; ``vector`` must have exactly the right length."""
        params = list(self.adapter_parameters().values())
        expected = sum(p.numel() for p in params)
        if vector.dim() != 1 or vector.numel() != expected:
            raise ValueError(
                f"adapter vector must be 1-D with {expected} elements, "
                f"got shape {tuple(vector.shape)}"
            )
        for param, chunk in zip(params, vector.split([p.numel() for p in params]), strict=True):
            copy_full_(param, chunk.view(param.shape))
        self.mark_initialized()

    # ----------------------------------------------------------------- helpers for forward
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

    def _runs_base_only(self) -> bool:
        if self.disabled and self.merged:
            raise RuntimeError(
                "the adapter is merged into the base weight; unmerge() before disabling it"
            )
        return self.disabled or self.merged

    def _lora_input(self, x: Tensor) -> Tensor | None:
        """The low-rank branch's input when dropout changes it, else ``None`` (reuse ``x``)."""
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            return None
        return self.lora_dropout(x)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"{kind}: in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
            + (", detach_norm=True" if self.detach_norm else "")
            + (", merged=True" if self.merged else "")
        )
