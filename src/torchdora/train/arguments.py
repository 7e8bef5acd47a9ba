"""``TrainingArguments``: every knob of a :class:`~torchdora.train.Trainer` run, in one dataclass
that a config file or command line maps onto."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchdora.train.optim import RECOMMENDED_MAGNITUDE_LR_RATIO
from torchdora.train.precision import PRECISIONS
from torchdora.train.progress import PROGRESS_MODES
from torchdora.train.schedule import SCHEDULER_TYPES


@dataclass
class TrainingArguments:
    """How to train (names follow ``transformers.TrainingArguments`` where it has them).

    Args:
        learning_rate: lr of ``lora_A`` and of fully trained modules (heads).
        magnitude_lr: lr of DoRA magnitudes; ``None`` = ``learning_rate * magnitude_lr_ratio``.
        magnitude_lr_ratio: see ``magnitude_lr``; 3 is a commonly recommended start.
        loraplus_lr_ratio: LoRA+: ``lora_B``'s lr = this × ``learning_rate`` (1 = off).
        weight_decay: AdamW decay of ``lora_A``/``lora_B`` and of trained matrices.
        magnitude_weight_decay: decay of the magnitudes (0: decay would shrink the rows).
        lr_scheduler_type: ``"cosine"``, ``"linear"`` or ``"constant"`` after warmup.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly from 0.
        min_lr_ratio: the lr at the end of the decay, relative to the peak.
        max_grad_norm: clip the global gradient norm to this; ``None`` = no clipping.
        train_batch_size: examples per micro-batch (one forward/backward).
        gradient_accumulation_steps: micro-batches per optimizer step.
        num_train_epochs: passes over the training set (ignored when ``max_steps`` is set).
        max_steps: optimizer steps of the run; ``None`` = as many as the epochs need.
        precision: ``"fp32"``, ``"bf16"`` (CPU or CUDA autocast), ``"fp16"`` (CUDA, with
            loss scaling) or ``"auto"`` (bf16 where the hardware has it, see
            :func:`~torchdora.train.precision.resolve_precision`).
        device: ``"cpu"``, ``"cuda"``, …; ``None`` = CUDA when available, else CPU.
        seed: seeds the RNGs at the start of training and the per-epoch shuffling.
        logging_steps: report loss/lr/throughput every this many optimizer steps.
        eval_steps: evaluate every this many steps (and always at the end); ``None`` = at
            the end only.
        save_steps: write the checkpoint every this many steps (and at the end) when
            ``checkpoint_dir`` is set; ``None`` = at the end only.
        checkpoint_dir: where the resumable checkpoint goes (replaced on each save).
        metrics_file: append every log and eval record here as a JSON line.
        progress: ``"auto"`` (bar on a terminal, lines otherwise), ``"bar"``, ``"log"``,
            ``"none"``.
    """

    learning_rate: float = 1e-3
    magnitude_lr: float | None = None
    magnitude_lr_ratio: float = RECOMMENDED_MAGNITUDE_LR_RATIO
    loraplus_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    magnitude_weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    max_steps: int | None = None
    precision: str = "fp32"
    device: str | None = None
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    checkpoint_dir: str | None = None
    metrics_file: str | None = None
    progress: str = "auto"

    def __post_init__(self) -> None:
        problem = field_type_problem(type(self), dataclasses.asdict(self))
        if problem:
            raise TypeError(problem)
        for name in ("train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_steps", "eval_steps", "save_steps"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.max_steps is None:
            _check_positive_int("num_train_epochs", self.num_train_epochs)
        for name in ("learning_rate", "magnitude_lr", "magnitude_lr_ratio", "loraplus_lr_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # also refuses NaN
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        for name, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("lr_scheduler_type", self.lr_scheduler_type, SCHEDULER_TYPES),
            ("progress", self.progress, PROGRESS_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def field_type_problem(cls: type, values: Mapping[str, Any]) -> str | None:
    """What is wrong with the first of ``values`` (by field name of the dataclass ``cls``, with
    ``-`` or ``_``) that does not have its field's declared type; ``None`` if all do. Names
    that are no field are left to the caller."""
    hints = typing.get_type_hints(cls)
    declared = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in declared and not _has_type(value, hints[name]):
            return f"{key} must be {declared[name]}, got {value!r}"
    return None


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (a class, ``list[str]`` or a union of them):
    an int is a float too, a bool neither; list items are checked by their users."""
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, typing.get_origin(hint) or hint)
