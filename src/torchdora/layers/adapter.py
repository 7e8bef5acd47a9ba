"""One named adapter of a DoRA layer: ``A``, ``B``, ``m`` and the settings they belong to.

A :class:`~torchdora.DoRALayer` holds one or more of these in ``layer.adapters`` (an
``nn.ModuleDict`` keyed by adapter name, as PEFT keys its ``lora_A``/``lora_B`` dicts); the one
named by ``layer.active_adapter`` computes. What depends on the base weight (initialisation,
norms, merging) is the layer's; the adapter only owns its tensors and hyperparameters.
"""

from __future__ import annotations

import math
import re
from numbers import Real

import torch
from torch import nn

from torchdora.layers.cache import TensorCache, same_storage

#: the smallest norm floor whose square is a normal float32 (smaller ones floor at 0: NaN rows)
MIN_EPS = math.sqrt(torch.finfo(torch.float32).tiny)

#: Initialisations of ``A`` (``B`` always starts at 0, so every one reproduces the base layer).
LORA_INITS = ("default", "gaussian")

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


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


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter: a module key and a folder name (PEFT saves every
    adapter but ``"default"`` in a subfolder of that name), else a ``ValueError`` saying why."""
    if not isinstance(name, str):
        raise TypeError(f"an adapter name must be a string, got {type(name).__name__} {name!r}")
    if not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not usable: use letters, digits, '_' and '-' (not first); "
            "the name becomes a module key and a folder name, so no '.', '/', spaces or ''"
        )
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is reserved (an nn.ModuleDict attribute)")
    return name


class DoRAAdapter(nn.Module):
    """The tensors and settings of one adapter on a layer of ``in_features → out_features``.

    Args:
        in_features, out_features: the sizes of the layer's weight matrix ``W``.
        rank: ``r``; ``A`` is ``(r, in_features)``, ``B`` is ``(out_features, r)``.
        alpha: scale numerator; ``None`` means ``alpha = rank``.
        dropout: dropout probability on the low-rank branch's input.
        use_rslora: ``s = alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: ``False``: plain LoRA (no magnitude).
        detach_norm: treat the row norm as a constant in backward (paper §4.3, PEFT).
        normalize: ``False``: the seed guide's "no norm" ablation, ``W' = m ⊙ (W + s·BA) / ‖W‖``
            with ``‖W‖`` the frozen base's row norms, a constant (:class:`~torchdora.DoRAConfig`).
        eps: floor of the row norm.
        init: how ``A`` starts (see :data:`LORA_INITS`).
        factor_dtype: dtype of ``A`` and ``B``; magnitude_dtype: of ``m``; device: of all three.

    The values are left empty: the layer initialises them from its base weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float | None,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        detach_norm: bool,
        eps: float,
        init: str,
        factor_dtype: torch.dtype,
        magnitude_dtype: torch.dtype,
        device: torch.device | str | None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_adapter_args(rank, alpha, dropout, eps, init)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.use_dora = use_dora
        self.detach_norm = detach_norm
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if not normalize and not use_dora:
            raise ValueError("normalize=False is a DoRA variant: it needs use_dora=True")
        self.normalize = normalize
        self.eps = eps
        self.init = init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": device, "dtype": factor_dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        if use_dora:
            self.magnitude = nn.Parameter(
                torch.empty(out_features, device=device, dtype=magnitude_dtype)
            )
        else:
            self.register_parameter("magnitude", None)
        self.uninitialized: set[str] = set(self.parameter_names())
        self.scale_cache = TensorCache()  # m / n for no-grad forwards, see DoRALayer
        self._frozen_flags: dict[str, bool] | None = None

    @property
    def dropout(self) -> float:
        """The dropout probability of the low-rank branch's input."""
        return getattr(self.lora_dropout, "p", 0.0)

    def parameter_names(self) -> tuple[str, ...]:
        """``("lora_A", "lora_B", "magnitude")``, without ``magnitude`` for plain LoRA."""
        return ("lora_A", "lora_B") + (("magnitude",) if self.magnitude is not None else ())

    def named_factors(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters by name, in :meth:`parameter_names` order."""
        return {name: getattr(self, name) for name in self.parameter_names()}

    # ----------------------------------------------------------------- trainable or not
    def freeze(self) -> None:
        """Stop training this adapter (it is not the active one), remembering which of its
        parameters trained, so that :meth:`unfreeze` restores exactly those."""
        if self._frozen_flags is None:
            self._frozen_flags = {n: p.requires_grad for n, p in self.named_factors().items()}
        self.requires_grad_(False)

    def unfreeze(self) -> None:
        """Train again what trained before :meth:`freeze` (a frozen magnitude stays frozen)."""
        if self._frozen_flags is None:
            return
        for name, param in self.named_factors().items():
            param.requires_grad_(self._frozen_flags.get(name, True))
        self._frozen_flags = None

    def trains(self, param_name: str) -> bool:
        """Whether parameter ``param_name`` trains when this adapter is the active one."""
        if self._frozen_flags is not None:
            return self._frozen_flags.get(param_name, True)
        return getattr(self, param_name).requires_grad

    # ----------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state dict may hand a parameter its own tensor back, which loads no values:
        # torch.distributed.checkpoint's set_model_state_dict fills the keys it was not given so.
        loaded = {
            name
            for name in self.parameter_names()
            if (value := state_dict.get(prefix + name)) is not None
            and not same_storage(value, getattr(self, name))
        }
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.uninitialized -= loaded

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"{kind}: rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
            + (f", dropout={self.dropout:g}" if self.dropout else "")
            + (", detach_norm=True" if self.detach_norm else "")
            + (", normalize=False" if not self.normalize else "")
        )
