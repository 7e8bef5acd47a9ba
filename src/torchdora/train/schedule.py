"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The schedule is a multiplier on every parameter group's own lr, so the ratios set by
:func:`~torchdora.train.optim.get_parameter_groups` (magnitude lr, LoRA+) hold at every step.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULER_TYPES = ("cosine", "linear", "constant")


class WarmupDecay:
    """The lr multiplier at optimizer step ``step`` (0-based: the multiplier before update 1).

    Rises linearly from 0 to 1 over ``num_warmup_steps``, then decays to ``min_lr_ratio`` at
    ``num_training_steps`` along a half cosine (``"cosine"``) or a line (``"linear"``), or
    stays at 1 (``"constant"``): the shapes of ``transformers``' ``get_*_schedule_with_warmup``.
    Picklable, so a ``LambdaLR`` using it saves it in its ``state_dict``.
    """

    def __init__(
        self,
        scheduler_type: str,
        num_warmup_steps: int,
        num_training_steps: int,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if scheduler_type not in SCHEDULER_TYPES:
            raise ValueError(
                f"lr_scheduler_type must be one of {SCHEDULER_TYPES}, got {scheduler_type!r}"
            )
        if not 0 <= num_warmup_steps <= num_training_steps:
            raise ValueError(
                f"need 0 <= num_warmup_steps ({num_warmup_steps}) "
                f"<= num_training_steps ({num_training_steps})"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.scheduler_type = scheduler_type
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return step / self.num_warmup_steps
        if self.scheduler_type == "constant":
            return 1.0
        decay_steps = max(1, self.num_training_steps - self.num_warmup_steps)
        progress = min(1.0, (step - self.num_warmup_steps) / decay_steps)
        if self.scheduler_type == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def get_scheduler(
    optimizer: torch.optim.Optimizer,
    scheduler_type: str = "cosine",
    *,
    num_warmup_steps: int = 0,
    num_training_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` over :class:`WarmupDecay`; call ``scheduler.step()`` after each update."""
    return LambdaLR(
        optimizer, WarmupDecay(scheduler_type, num_warmup_steps, num_training_steps, min_lr_ratio)
    )
