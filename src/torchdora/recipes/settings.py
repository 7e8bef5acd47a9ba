"""``FinetuneConfig``: every setting of one ``torchdora finetune`` run, declared once.

Each field carries its documentation in ``metadata`` (see :func:`setting`): the command line's
flags (``--name-with-dashes``), their help text, the ``--config`` file keys (the field names,
with ``-`` or ``_``), the type checks and the allowed values are all generated from it, and so
are the renames into :class:`~torchdora.train.TrainingArguments` (``lr`` → ``learning_rate``…).
Adapter defaults come from :mod:`torchdora.defaults`; what a task changes is declared in the
task's own module (:attr:`~torchdora.recipes.tasks.Task.defaults`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchdora import quantization
from torchdora.analysis import METRICS_FILE
from torchdora.config import ALL_LINEAR, DoRAConfig
from torchdora.defaults import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_RANK
from torchdora.recipes.methods import METHODS
from torchdora.recipes.run_folder import CHECKPOINT_DIR
from torchdora.recipes.tasks import TASKS
from torchdora.train import TrainingArguments
from torchdora.train.arguments import field_type_problem
from torchdora.train.optim import RECOMMENDED_MAGNITUDE_LR_RATIO
from torchdora.train.precision import PRECISIONS
from torchdora.train.progress import PROGRESS_MODES

_NAMES = re.compile(r"[\w.]+")  # a module name or path: anything else makes a regex


def setting(
    default: Any,
    help: str,
    *,
    choices: Callable[[], tuple[str, ...]] | None = None,
    training: str | None = None,
    recorded: bool = True,
    default_help: str | None = None,
) -> Any:
    """A field of :class:`FinetuneConfig` with its documentation.

    Args:
        default: the value when neither a task, a config file nor a flag sets it.
        help: what it does, for ``--help`` and the CLI reference.
        choices: the allowed values (a function: registries fill up after import).
        training: the :class:`~torchdora.train.TrainingArguments` field it sets, if any.
        recorded: written to the run's ``config.json``; ``False`` for what the run does
            rather than what it is (``overwrite``).
        default_help: what the default means, where ``default`` (``None``) does not say.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "training": training,
        "recorded": recorded,
        "default_help": default_help,
    }
    return field(default=default, metadata=metadata)


@dataclass
class FinetuneConfig:
    """One fine-tune run. Defaults are the main job: DoRA on MiniLM's attention, BBC News.

    Every field is documented in its ``metadata["help"]`` (``torchdora finetune --help``
    prints them). Build it with :meth:`from_dict` to get the task's own defaults
    (:attr:`~torchdora.recipes.tasks.Task.defaults`) for the settings not given; the
    constructor takes the values as they are.
    """

    task: str = setting(
        "classification",
        "what to train: classify texts (bundled: MiniLM on BBC News), or tune a chat model on "
        "conversations (bundled: SmolLM2-135M-Instruct on the ChatterBot corpus)",
        choices=lambda: tuple(TASKS),
    )
    method: str = setting(
        "dora",
        "how to train: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()),
        choices=lambda: tuple(METHODS),
    )
    rank: int = setting(DEFAULT_RANK, "adapter rank r")
    alpha: float = setting(
        DEFAULT_ALPHA, "adapter scale numerator (the update is scaled by alpha/r)"
    )
    dropout: float = setting(DEFAULT_DROPOUT, "dropout on the adapter's input (0: exact DoRA)")
    targets: list[str] | str | None = setting(
        None,
        "modules to adapt: names separated by commas (each matching the module of that name "
        "or whose name ends in .NAME), all-linear, or a regular expression matched against "
        "whole module names",
        default_help="per architecture",
    )
    model: str | None = setting(None, "local transformers model folder", default_help="the task's")
    data: str | None = setting(None, "CSV/TSV/JSONL file", default_help="the task's bundled data")
    text_column: str = setting("text", "column of --data holding the texts")
    label_column: str = setting("label", "column of --data holding the labels")
    test_size: float = setting(0.2, "fraction of the data held out for evaluation")
    split_seed: int = setting(0, "seed of the held-out split (fixed across --seed values)")
    train_per_class: int | None = setting(
        None,
        "low-data runs (classification): train on this many examples of each label, drawn "
        "from the training split by --seed, the rest of it unused; the held-out split stays",
        default_help="all of the training split",
    )
    max_length: int = setting(128, "tokens per text (longer texts are truncated)")
    epochs: int = setting(
        1, "passes over the training data (ignored with --max-steps)", training="num_train_epochs"
    )
    max_steps: int | None = setting(
        None,
        "optimizer steps of the run",
        default_help="as many as --epochs need",
        training="max_steps",
    )
    lr: float = setting(3e-3, "learning rate", training="learning_rate")
    magnitude_lr: float | None = setting(
        None,
        "learning rate of DoRA's magnitude",
        default_help=f"{RECOMMENDED_MAGNITUDE_LR_RATIO:g} x --lr",
        training="magnitude_lr",
    )
    loraplus_ratio: float = setting(
        1.0,
        "LoRA+: lora_B's learning rate is this times --lr (1: off)",
        training="loraplus_lr_ratio",
    )
    batch_size: int = setting(16, "examples per micro-batch", training="train_batch_size")
    grad_accum: int = setting(
        1, "micro-batches per optimizer step", training="gradient_accumulation_steps"
    )
    warmup_ratio: float = setting(
        0.1, "fraction of the steps spent warming the learning rate up", training="warmup_ratio"
    )
    max_grad_norm: float | None = setting(
        1.0, "clip the gradient norm to this (none: no clipping)", training="max_grad_norm"
    )
    precision: str = setting(
        "auto",
        "fp32, bf16 or fp16 autocast; auto: bf16 where the hardware has it natively, else fp32",
        choices=lambda: PRECISIONS,
        training="precision",
    )
    seed: int = setting(0, "random seed (new weights, data order)", training="seed")
    eval_steps: int | None = setting(
        None,
        "evaluate every this many steps",
        default_help="at the end only",
        training="eval_steps",
    )
    save_steps: int | None = setting(
        None,
        "write the checkpoint every this many steps",
        default_help="at the end only",
        training="save_steps",
    )
    quantize: str | None = setting(
        None,
        "QDoRA: quantize every Linear but the head first",
        choices=lambda: quantization.QUANTIZATION_METHODS,
    )
    output: str | None = setting(None, "run folder to write", default_help="write nothing")
    resume: str | None = setting(None, "checkpoint/ folder of an earlier run to continue")
    overwrite: bool = setting(
        False,
        "remove an earlier run's files from --output first (other files stay)",
        recorded=False,
    )
    progress: str = setting(
        "auto",
        "auto: a bar on a terminal, else log lines",
        choices=lambda: PROGRESS_MODES,
        training="progress",
    )

    def __post_init__(self) -> None:
        self.check_types(dataclasses.asdict(self))
        for spec in dataclasses.fields(self):
            choices = spec.metadata["choices"]
            value = getattr(self, spec.name)
            if choices is not None and value is not None and value not in choices():
                raise ValueError(f"{spec.name} must be one of {choices()}, got {value!r}")
        if self.train_per_class is not None:
            if self.train_per_class < 1:
                raise ValueError(
                    f"train_per_class must be a positive integer, got {self.train_per_class}"
                )
            if self.task != "classification":
                raise ValueError(
                    "train_per_class counts examples per label: it is a setting of --task "
                    f"classification, not {self.task}"
                )
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if METHODS[self.method].adapter is None and self.quantize is not None:
            raise ValueError(
                f"method {self.method!r} trains the base weights, which --quantize freezes"
            )
        for name in ("output", "resume"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must be a folder path, got an empty string")
        if self.overwrite and self.resume is not None:
            raise ValueError("overwrite starts the run afresh and resume continues it: pick one")
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        self.dora_config(head=None)  # validates rank, alpha, dropout, targets
        self.training_arguments()  # validates the training settings

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Build from a flat mapping (a config file, flags); keys may use ``-`` or ``_``.
        Settings missing from it take the task's defaults, then the dataclass defaults."""
        values = {str(key).replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(values) - {spec.name for spec in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown settings {unknown}: the settings are the flags of "
                "`torchdora finetune --help`, with - or _"
            )
        task = TASKS.get(values.get("task", cls.task))
        return cls(**{**(task.defaults if task else {}), **values})

    @classmethod
    def check_types(cls, values: dict[str, Any]) -> None:
        """Raise ``ValueError`` for the first of ``values`` (settings by name, with ``-`` or
        ``_``) that does not have its field's declared type; unknown names are left to
        :meth:`from_dict`. An int is a float too, a bool neither."""
        problem = field_type_problem(cls, values)
        if problem:
            raise ValueError(problem)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recorded_settings(self) -> dict[str, Any]:
        """What the run's ``config.json`` holds: every setting but actions (``overwrite``)."""
        recorded = {spec.name for spec in dataclasses.fields(self) if spec.metadata["recorded"]}
        return {name: value for name, value in self.to_dict().items() if name in recorded}

    def dora_config(self, head: list[str] | None) -> DoRAConfig:
        """The adapters of this run (for ``full``, the modules it trains), ``head`` trained
        in full."""
        return DoRAConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.targets,
            modules_to_save=head,
            **(METHODS[self.method].adapter or {}),
        )

    def describe_method(self) -> str:
        """``DORA r=8 alpha=16``, or ``FULL fine-tune`` (which has no rank): for the run's log."""
        if METHODS[self.method].adapter is None:
            return f"{self.method.upper()} fine-tune"
        return f"{self.method.upper()} r={self.rank} alpha={self.alpha:g}"

    def training_arguments(self) -> TrainingArguments:
        """The :class:`~torchdora.train.TrainingArguments` of this run; a bad value is
        named by its setting here (``lr``), not by its name there (``learning_rate``)."""
        out = Path(self.output) if self.output else None
        renamed = {
            spec.metadata["training"]: spec.name
            for spec in dataclasses.fields(self)
            if spec.metadata["training"]
        }
        try:
            return TrainingArguments(
                **{training: getattr(self, name) for training, name in renamed.items()},
                checkpoint_dir=str(out / CHECKPOINT_DIR) if out else None,
                metrics_file=str(out / METRICS_FILE) if out else None,
            )
        except ValueError as err:
            name, _, rest = str(err).partition(" ")
            raise ValueError(f"{renamed.get(name, name)} {rest}") from None


def parse_targets(text: str) -> list[str] | str:
    """``targets`` as the command line gives them: ``"all-linear"``; module names separated by
    commas (``"query"``, ``"query,value"``, ``"layer.0.attention.self.query"``), a list; or,
    where any other character appears (``".*\\.(query|value)"``), a regex, kept as it is."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if text == ALL_LINEAR or not names or not all(_NAMES.fullmatch(n) for n in names):
        return text
    return names
