"""The task protocol and registry: what ``torchdora finetune --task NAME`` runs.

A task is one module that defines its ``run`` function (on the shared pieces of
:mod:`torchdora.recipes.pipeline`) and ends with ``register_task(Task(...))``;
:mod:`torchdora.recipes` imports it, which registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Log = Callable[[str], None]


@dataclass(frozen=True)
class Metric:
    """A number of a run's ``metrics.json`` that ``--compare`` tabulates.

    Args:
        key: its key in ``metrics.json``.
        label: the column header.
        higher_is_better: which way is better; ``None`` for a number that is shown but not
            compared (the value before training).
    """

    key: str
    label: str
    higher_is_better: bool | None


@dataclass(frozen=True)
class Task:
    """A kind of fine-tune.

    Args:
        name: the ``--task`` value.
        run: ``run(config, output, log)`` trains and evaluates ``config`` (a
            :class:`~torchdora.recipes.FinetuneConfig` whose ``task`` is ``name``), writes
            the run folder ``output`` when it is not ``None`` (already checked and created)
            and returns what ``metrics.json`` holds.
        metrics: what ``--compare`` reports, from ``metrics.json``.
        defaults: settings this task changes from ``FinetuneConfig``'s defaults.
    """

    name: str
    run: Callable[[Any, Path | None, Log], dict[str, Any]]  # (FinetuneConfig, output, log)
    metrics: tuple[Metric, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)


#: The registered tasks by name, in registration order.
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` runnable by name (``--task``); returns it."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is registered already")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]
