"""``DoRAConfig``: what :func:`torchdora.apply_dora` adapts, and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_EPS, DEFAULT_RANK
from torchdora.layers.adapter import check_adapter_args

BIAS_MODES = ("none", "all", "dora_only")
ALL_LINEAR = "all-linear"


@dataclass
class DoRAConfig:
    """Hyperparameters and targets for :func:`torchdora.apply_dora`.

    Args:
        rank: ``r`` of every adapted layer (see ``rank_pattern`` for exceptions).
        alpha: scale numerator, ``s = alpha / rank``; ``None`` means ``alpha = rank``.
        dropout: dropout on the low-rank branch's input. Default 0: the layer is then exactly
            DoRA and cheapest (PEFT's default too); the paper used 0.05 for LLaMA runs.
        target_modules: which modules to adapt: a list of names, each matching a module
            whose full name equals it or ends in ``"." + name`` (``["q_proj", "v_proj"]``);
            a string, matched as a regular expression against the whole name
            (``r".*\\.layers\\.[0-3]\\..*_proj"``); or ``"all-linear"``: every Linear-like
            module except the output head. ``None``: the defaults for the model's
            architecture (``model.config.model_type``), see ``torchdora.DEFAULT_TARGET_MODULES``.
        exclude_modules: modules never adapted, in the same forms (list or regex).
        use_dora: ``False`` gives plain LoRA with the same machinery (baselines).
        magnitude_trainable: train the magnitude ``m``; ``False`` keeps ``m = ‖W_i‖``.
        use_rslora: ``s = alpha / sqrt(rank)``.
        detach_norm: treat the row norm as a constant in backward (paper §4.3 / PEFT).
        normalize: ``False`` is the seed guide's "DoRA without normalisation" ablation:
            ``W' = m ⊙ (W + s·B A) / ‖W‖`` with ``‖W‖`` the frozen base's row norms, a
            constant, and ``m`` initialised to it, so the model starts as its base. Magnitude and
            direction are then no longer decoupled (the norm of ``W'_i`` is ``m_i·‖V_i‖/‖W_i‖``).
            Read literally, the guide's ``m ⊙ (V + BA)`` with ``m = ‖W‖`` would not start at the
            base model. PEFT cannot express it: its files carry a ``peft_type`` PEFT refuses.
        eps: floor of the row norm.
        rank_pattern: ``{pattern: rank}`` overriding ``rank`` for the modules a pattern
            matches (a regex matched against the end of the name at a ``.`` boundary, as in
            PEFT); the first matching pattern wins.
        alpha_pattern: ``{pattern: alpha}``, likewise for ``alpha``.
        modules_to_save: modules (name suffixes, as for a list ``target_modules``) trained in
            full, e.g. a new classification head; they are replaced by a trainable copy and
            the original is kept for :func:`torchdora.disable_adapter`.
        bias: ``"none"`` (every bias frozen), ``"all"`` (every bias in the model trained) or
            ``"dora_only"`` (the biases of the adapted layers trained). Trained biases are part
            of the model, so ``disable_adapter`` does not undo them.
        init: ``"default"`` (``A`` Kaiming-uniform, as LoRA/PEFT) or ``"gaussian"``
            (``A ~ N(0, 1/r²)``); ``B = 0`` either way, so the model starts unchanged.
    """

    rank: int = DEFAULT_RANK
    alpha: float | None = DEFAULT_ALPHA
    dropout: float = DEFAULT_DROPOUT
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_dora: bool = True
    magnitude_trainable: bool = True
    use_rslora: bool = False
    detach_norm: bool = False
    normalize: bool = True
    eps: float = DEFAULT_EPS
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    bias: str = "none"
    init: str = "default"

    def __post_init__(self) -> None:
        check_adapter_args(self.rank, self.alpha, self.dropout, self.eps, self.init)
        self.target_modules = _check_names("target_modules", self.target_modules)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules)
        self.modules_to_save = _check_names("modules_to_save", self.modules_to_save)
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(self.normalize).__name__}")
        if not self.normalize and not self.use_dora:
            raise ValueError("normalize=False is a DoRA variant: it needs use_dora=True")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        for name, pattern in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            if not isinstance(pattern, dict):
                raise TypeError(
                    f"{name} must be a dict {{pattern: value}}, got {type(pattern).__name__}"
                )
            for key, value in pattern.items():
                _compile(name, key)
                if name == "rank_pattern":
                    check_adapter_args(value, self.alpha, self.dropout, self.eps)
                else:
                    check_adapter_args(self.rank, value, self.dropout, self.eps)

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name`` (``rank_pattern`` first, then ``rank``)."""
        return _pattern_value(self.rank_pattern, module_name, self.rank)

    def alpha_for(self, module_name: str) -> float | None:
        """The alpha of ``module_name`` (``alpha_pattern`` first, then ``alpha``)."""
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def pattern_matches(pattern: str, module_name: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key matches a module name."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name) is not None


def _pattern_value(patterns: dict, module_name: str, default):
    return next((v for k, v in patterns.items() if pattern_matches(k, module_name)), default)


def _compile(option: str, pattern: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{option} keys must be strings, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"{option}: {pattern!r} is not a valid regular expression ({err})"
        ) from None


def _check_names(option: str, names: list[str] | str | None) -> list[str] | str | None:
    """Validate a list-of-names or regex option; lists are copied, strings compiled once."""
    if names is None:
        return None
    if isinstance(names, str):
        if option == "modules_to_save":
            raise TypeError(f"{option} must be a list of module names, got the string {names!r}")
        if names != ALL_LINEAR or option != "target_modules":
            _compile(option, names)
        return names
    if isinstance(names, list | tuple | set):
        names = list(names)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad or not names:
            raise ValueError(f"{option} must be a non-empty list of module names, got {names!r}")
        return names
    raise TypeError(
        f"{option} must be a list of module names or a regex string, got {type(names).__name__}"
    )
