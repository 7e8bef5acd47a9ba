"""The text-classification fine-tune behind ``torchdora finetune``, as a library function.

:class:`FinetuneConfig` is every setting of one run (the CLI's flags and config-file keys are
its field names); :func:`run_finetune` loads the model and data, adapts the model, trains,
evaluates before and after, and writes the run folder:

* ``adapter/``: the adapter in PEFT's format (plus ``labels.json``, the class names);
* ``merged/``: the model with the adapter merged in, loadable by ``transformers`` alone;
* ``config.json``: the resolved settings; ``metrics.json``: the results;
  ``metrics.jsonl``: every log/eval record; ``checkpoint/``: what ``--resume`` continues from.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdora.analysis import (
    DECOMPOSITION_FILE,
    METRICS_FILE,
    DecompositionTracker,
)
from torchdora.config import ALL_LINEAR, DoRAConfig
from torchdora.distributed import is_main_process
from torchdora.io import AdapterFileError, load_adapter, save_adapter, save_merged
from torchdora.io.files import not_a_folder, read_config
from torchdora.io.peft_format import PREFIX
from torchdora.model import apply_dora, count_trainable_parameters
from torchdora.model.targeting import find_targets, name_matches
from torchdora.quantization import QUANTIZATION_METHODS, quantize_model
from torchdora.run_folder import CHECKPOINT_DIR, run_folder
from torchdora.train import (
    DataError,
    Trainer,
    TrainingArguments,
    bundled_model_path,
    check_max_length,
    evaluate_classification,
    fit_max_length,
    load_bbc_news,
    load_sequence_classifier,
    load_text_classification,
    pad_collate,
    set_seed,
    tokenize_classification,
    train_test_split,
)
from torchdora.train.arguments import field_type_problem

if TYPE_CHECKING:
    from torch import nn

#: ``full`` trains the weights of the modules the adapters would target (the baseline of the
#: paper's analysis); ``dora-frozen-magnitude`` keeps DoRA's magnitude at its initial norms.
METHODS = ("dora", "lora", "dora-frozen-magnitude", "full")
TASKS = ("classification", "causal-lm")
#: What a task changes from the dataclass defaults unless set: the causal-LM default run
#: (SmolLM2-135M on the ChatterBot corpus) fits in about 10 minutes on 2 CPU cores.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal-lm": {"test_size": 0.1, "max_steps": 40, "batch_size": 8, "lr": 2e-3},
}
LABELS_FILE = "labels.json"
HEAD_NAMES = ("classifier", "score", "pre_classifier")
_NAMES = re.compile(r"[\w.]+")  # a module name or path: anything else makes a regex


@dataclass
class FinetuneConfig:
    """One fine-tune run. Defaults are the main job: DoRA on MiniLM's attention, BBC News.

    Args:
        task: ``"classification"``, or ``"causal-lm"``: instruction tuning of a chat model on
            conversations (:mod:`torchdora.causal_lm`); its ``model`` ``None`` is the bundled
            SmolLM2-135M-Instruct, its ``data`` ``None`` the ChatterBot corpus.
        method: one of :data:`METHODS`.
        rank, alpha, dropout: the adapter's (see :class:`~torchdora.DoRAConfig`).
        targets: a list of module names (each matching the module of that name or whose name
            ends in ``"." + name``) or a string: comma-separated names (``"query,value"``),
            ``"all-linear"``, or else a regex matched against whole module names (see
            :func:`parse_targets`); ``None`` = the architecture's defaults.
        model: a local ``transformers`` model folder; ``None`` = the bundled MiniLM.
        data: a CSV/TSV/JSONL file with a text and a label column; ``None`` = BBC News.
        text_column, label_column: the columns of ``data``.
        test_size: held-out fraction (stratified, fixed by ``split_seed``).
        max_length: tokens per text (longer texts are truncated).
        epochs, max_steps, lr, magnitude_lr, loraplus_ratio, batch_size, grad_accum,
            warmup_ratio, max_grad_norm, precision, seed, eval_steps, save_steps:
            training settings, see :class:`~torchdora.train.TrainingArguments`.
        quantize: QDoRA: quantize every Linear but the head first, with one of
            :data:`torchdora.quantization.QUANTIZATION_METHODS` (e.g. ``"bnb-nf4"``).
        output: the run folder; ``None`` = write nothing. It must be new or empty unless
            ``resume`` or ``overwrite`` is set (see :func:`torchdora.run_folder.run_folder`).
        resume: a ``checkpoint/`` folder of an earlier run with the same settings.
        overwrite: start afresh in an ``output`` that holds an earlier run: its files
            (:data:`torchdora.run_folder.RUN_ENTRIES`) are removed first; other files stay.
            Not written to the run's ``config.json``: it is what the run did, not a setting.
        progress: ``"auto"``, ``"bar"``, ``"log"`` or ``"none"``.
    """

    task: str = "classification"
    method: str = "dora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str | None = None
    model: str | None = None
    data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    test_size: float = 0.2
    split_seed: int = 0
    max_length: int = 128
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 3e-3
    magnitude_lr: float | None = None
    loraplus_ratio: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    seed: int = 0
    eval_steps: int | None = None
    save_steps: int | None = None
    quantize: str | None = None
    output: str | None = None
    resume: str | None = None
    overwrite: bool = False
    progress: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.extra:
            raise ValueError(f"unknown settings: {sorted(self.extra)}")
        self.check_types(self.to_dict())
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.quantize is not None and self.quantize not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantize must be one of {QUANTIZATION_METHODS}, got {self.quantize!r}"
            )
        if self.method == "full" and self.quantize is not None:
            raise ValueError("method 'full' trains the base weights, which --quantize freezes")
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
        """Build from a flat mapping (a config file); keys may use ``-`` or ``_``. Settings
        missing from it take the task's :data:`TASK_DEFAULTS`, then the dataclass defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known, extra = {}, {}
        values = {str(key).replace("-", "_"): value for key, value in values.items()}
        for name, value in {**TASK_DEFAULTS.get(str(values.get("task")), {}), **values}.items():
            (known if name in names else extra)[name] = value
        return cls(**known, extra=extra)

    @classmethod
    def check_types(cls, values: dict[str, Any]) -> None:
        """Raise ``ValueError`` for the first of ``values`` (settings by name, with ``-`` or
        ``_``) that does not have its field's declared type; unknown names are left to
        :meth:`from_dict`. An int is a float too, a bool neither."""
        problem = field_type_problem(cls, {k: v for k, v in values.items() if k != "extra"})
        if problem:
            raise ValueError(problem)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}

    def dora_config(self, head: list[str] | None) -> DoRAConfig:
        return DoRAConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.targets,
            use_dora=self.method != "lora",
            magnitude_trainable=self.method != "dora-frozen-magnitude",
            modules_to_save=head,
        )

    def describe_method(self) -> str:
        """``DORA r=8 alpha=16``, or ``FULL fine-tune`` (which has no rank): for the run's log."""
        if self.method == "full":
            return "FULL fine-tune"
        return f"{self.method.upper()} r={self.rank} alpha={self.alpha:g}"

    def training_arguments(self) -> TrainingArguments:
        out = Path(self.output) if self.output else None
        return TrainingArguments(
            learning_rate=self.lr,
            magnitude_lr=self.magnitude_lr,
            loraplus_lr_ratio=self.loraplus_ratio,
            warmup_ratio=self.warmup_ratio,
            max_grad_norm=self.max_grad_norm,
            train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            precision=self.precision,
            seed=self.seed,
            eval_steps=self.eval_steps,
            save_steps=self.save_steps,
            checkpoint_dir=str(out / CHECKPOINT_DIR) if out else None,
            metrics_file=str(out / METRICS_FILE) if out else None,
            progress=self.progress,
        )


def parse_targets(text: str) -> list[str] | str:
    """``targets`` as the command line gives them: ``"all-linear"``; module names separated by
    commas (``"query"``, ``"query,value"``, ``"layer.0.attention.self.query"``), a list; or,
    where any other character appears (``".*\\.(query|value)"``), a regex, kept as it is."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if text == ALL_LINEAR or not names or not all(_NAMES.fullmatch(n) for n in names):
        return text
    return names


def unfreeze_targets(model, config: DoRAConfig) -> list[str]:
    """Full fine-tuning of what ``config`` would adapt: freeze ``model`` except the target
    modules and ``modules_to_save``; returns the target modules' names."""
    names = [target.name for target in find_targets(model, config)]
    model.requires_grad_(False)
    for name, module in model.named_modules():
        saved = config.modules_to_save and name_matches(config.modules_to_save, name)
        if name in names or saved:
            module.requires_grad_(True)
    return names


def run_statistics(trainable: int, total: int, summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of a finished run that every task's ``metrics.json`` holds, from the
    parameter counts and :meth:`~torchdora.train.Trainer.train`'s summary."""
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": summary["step"],
        "time_per_step_s": summary["time_per_step_s"],
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "train_runtime_s": summary["train_runtime_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _silent(line: str) -> None:
    """The ``log`` of ranks other than 0."""


def head_modules(model) -> list[str]:
    """The classification head's module names, trained in full (``modules_to_save``)."""
    return [name for name in HEAD_NAMES if hasattr(model, name)]


def quantize_base(
    model: nn.Module, config: FinetuneConfig, keep: Iterable[str], log: Callable[[str], None]
) -> None:
    """QDoRA: quantize every Linear of ``model`` but the modules in ``keep`` (and those inside
    them) with ``config.quantize``, in place; nothing without it. Call before adapting."""
    if config.quantize is None:
        return
    keep = tuple(keep)
    quantized = quantize_model(model, config.quantize, exclude=keep)
    kept = f"; kept in full precision: {', '.join(keep)}" if keep else ""
    log(f"quantized {len(quantized)} Linear layers with {config.quantize} (QDoRA){kept}")


def adapt_model(
    model: nn.Module, config: FinetuneConfig, head: list[str] | None
) -> list[str] | None:
    """Add ``config``'s adapters to ``model`` (``head`` trained in full), or for ``full``
    unfreeze the modules they would adapt. Returns the modules whose ΔM/ΔD to track: ``None``
    for every DoRA/LoRA layer, the unfrozen targets' names for ``full``. Each of a list of
    target names must match a module (``apply_dora`` asks that one of them does)."""
    dora_config = config.dora_config(head)
    try:
        if isinstance(dora_config.target_modules, list):
            for name in dora_config.target_modules:  # raises, naming it, if it matches nothing
                find_targets(model, dataclasses.replace(dora_config, target_modules=[name]))
        if config.method == "full":
            return unfreeze_targets(model, dora_config)
        apply_dora(model, dora_config)
    except TypeError as err:  # targets of a kind no adapter exists for: a bad setting here
        raise ValueError(str(err)) from None
    return None


def fitted_max_length(
    config: FinetuneConfig, model: nn.Module, tokenizer, log: Callable[[str], None]
) -> int:
    """``config.max_length`` cut to the positions ``model`` reads, saying so when it is cut."""
    max_length = fit_max_length(config.max_length, model, tokenizer)
    if max_length < config.max_length:
        log(
            f"max_length {config.max_length} is more than the model reads: texts are cut to "
            f"{max_length} tokens"
        )
    return max_length


def decomposition_callbacks(
    model: nn.Module, output: Path | None, modules: list[str] | None, *, resuming: bool
) -> list[Callable[[dict[str, Any]], None]]:
    """The :class:`~torchdora.train.Trainer` callbacks that append ΔM/ΔD of ``modules`` (see
    :class:`~torchdora.analysis.DecompositionTracker`) to ``output/decomposition.jsonl`` at
    every training log step, for ``torchdora analyze``; none without ``output``.

    Call with the model as it starts training: the tracker snapshots its weights now. Step 0
    is recorded unless ``resuming`` (the resumed run's file already holds it)."""
    if output is None:
        return []
    tracker = DecompositionTracker(model, modules=modules, path=output / DECOMPOSITION_FILE)
    if not resuming:
        tracker(0, model)

    def track(record: dict[str, Any]) -> None:
        if "loss" in record:  # a training log record, not an evaluation
            tracker(record["step"], model)

    return [track]


def run_finetune(config: FinetuneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``config`` end to end; returns the results written to ``metrics.json``.

    Raises ``ValueError`` subclasses (``DataError``, ``ModelLoadError``, …) for unusable
    input; a run that fails leaves the output folder as it found it, or resumable (see
    :func:`torchdora.run_folder.run_folder`).

    In a distributed run (``torchrun``, see :class:`~torchdora.train.Trainer`) every rank
    trains; only rank 0 logs and writes the run folder.
    """
    if not is_main_process():
        log = _silent
    if config.resume and not Path(config.resume).is_dir():
        raise ValueError(
            f"--resume: checkpoint folder {config.resume} {not_a_folder(config.resume)}"
        )
    resume, overwrite = config.resume is not None, config.overwrite
    with run_folder(config.output, resume=resume, overwrite=overwrite) as output:
        if config.task == "causal-lm":
            from torchdora.causal_lm import run_causal_lm  # imports this module

            return run_causal_lm(config, output, log)
        return run_classification(config, output, log)


def run_classification(
    config: FinetuneConfig, output: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """:func:`run_finetune` of a ``classification`` task, writing to ``output`` if given."""
    data = (
        load_bbc_news()
        if config.data is None
        else load_text_classification(config.data, config.text_column, config.label_column)
    )
    train_data, test_data = train_test_split(data, config.test_size, seed=config.split_seed)
    if not train_data.texts or not test_data.texts:
        raise DataError("the data is too small to hold out a test set; add examples")
    model_dir = config.model or bundled_model_path()
    set_seed(config.seed)  # the new head's and the adapters' initial values are part of the run
    model, tokenizer = load_sequence_classifier(model_dir, data.label_names)
    head = head_modules(model)
    quantize_base(model, config, keep=head, log=log)
    analysed = adapt_model(model, config, head)
    trainable, total = count_trainable_parameters(model)
    log(
        f"{config.describe_method()} on {Path(model_dir).name}: "
        f"{trainable:,} trainable of {total:,} parameters; {len(train_data.texts)} train / "
        f"{len(test_data.texts)} held-out examples, {len(data.label_names)} labels"
    )

    max_length = fitted_max_length(config, model, tokenizer, log)
    train_examples = tokenize_classification(tokenizer, train_data, max_length)
    test_examples = tokenize_classification(tokenizer, test_data, max_length)
    collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0)
    args = config.training_arguments()
    evaluate = partial(
        evaluate_classification,
        examples=test_examples,
        data_collator=collate,
        precision=args.precision,
    )
    before = evaluate(model)
    log(f"held-out accuracy before: {before['eval_accuracy']:.4f} (loss {before['eval_loss']:.4f})")
    trainer = Trainer(
        model,
        args,
        train_examples,
        data_collator=collate,
        eval_fn=evaluate,
        callbacks=decomposition_callbacks(
            model, output, analysed, resuming=config.resume is not None
        ),
    )
    summary = trainer.train(resume_from_checkpoint=config.resume)
    log(
        f"held-out accuracy after:  {summary['eval_accuracy']:.4f} "
        f"(loss {summary['eval_loss']:.4f}) — {summary['step']} steps, "
        f"{summary['time_per_step_s']:.3f} s/step"
    )
    results = {
        "method": config.method,
        "accuracy_before": before["eval_accuracy"],
        "loss_before": before["eval_loss"],
        "accuracy_after": summary["eval_accuracy"],
        "loss_after": summary["eval_loss"],
        **run_statistics(trainable, total, summary),
        "label_names": data.label_names,
    }
    if output is not None:
        base = str(Path(model_dir).resolve())  # evaluate/predict find it from any folder
        adapter = write_run(output, config, model, tokenizer, results, base)
        if adapter is not None:
            (adapter / LABELS_FILE).write_text(json.dumps(results["label_names"]) + "\n")
        log(f"wrote {describe_run(output, adapter)}")
    return results


def write_run(
    output: Path,
    config: FinetuneConfig,
    model,
    tokenizer,
    results: dict[str, Any],
    base_model_name_or_path: str | None = None,
) -> Path | None:
    """Write a finished run's folder (see the module docstring); returns ``adapter/``, or
    ``None`` for a full fine-tune, which has no adapter, only the ``merged/`` model."""
    adapter = None
    if config.method != "full":
        adapter = save_adapter(
            model, output / "adapter", base_model_name_or_path=base_model_name_or_path
        )
    tokenizer.save_pretrained(save_merged(model, output / "merged"))
    settings = {k: v for k, v in config.to_dict().items() if k != "overwrite"}  # an action
    (output / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (output / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return adapter


def describe_run(output: Path, adapter: Path | None) -> str:
    """What :func:`write_run` wrote, for the run's last log line."""
    written = f"{adapter} (PEFT format), " if adapter is not None else ""
    return f"{written}{output}/merged, metrics.json, config.json"


def load_classifier(model: str | None, adapter: str | None, max_length: int = 128):
    """``(model, tokenizer, label_names, max_length)`` for evaluation/prediction, ``max_length``
    cut to the model's positions.

    ``model`` is a folder (``None``: see :func:`model_folder`); with ``adapter`` (a run's
    ``adapter/`` folder) the adapter is loaded on top and the class names come from its
    ``labels.json``; without, they come from the model's ``config.json`` (e.g. a run's
    ``merged/`` folder).
    """
    check_max_length(max_length)  # before the model is loaded
    if adapter is not None:
        labels_path = Path(adapter) / LABELS_FILE
        label_names = read_label_names(labels_path)
    model_dir = model_folder(model, adapter)
    if adapter is None:
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} is not a transformers model folder (no config.json)")
        id2label = json.loads(config_path.read_text()).get("id2label") or {}
        label_names = [id2label[k] for k in sorted(id2label, key=int)]
        if not label_names:
            raise ValueError(f"{model_dir} has no classification labels; pass --adapter")
    classifier, tokenizer = load_sequence_classifier(model_dir, label_names)
    if adapter is not None:
        try:
            load_adapter(classifier, adapter)
        except AdapterFileError as err:
            if not any(f"{PREFIX}{head}." in str(err) for head in head_modules(classifier)):
                raise
            raise AdapterFileError(
                f"{err} (the classification head is built for the {len(label_names)} labels "
                f"in {labels_path})"
            ) from err
    return (
        classifier.eval(),
        tokenizer,
        label_names,
        fit_max_length(max_length, classifier, tokenizer),
    )


def model_folder(model: str | None, adapter: str | None) -> Path:
    """The folder to load: ``model``; without it, the local folder ``adapter``'s config records
    as its base model (``base_model_name_or_path``) if it exists, else the bundled MiniLM."""
    if model:
        return Path(model)
    base = read_config(adapter).get("base_model_name_or_path") if adapter is not None else None
    if isinstance(base, str) and Path(base).is_dir():
        return Path(base)
    return bundled_model_path()


def read_label_names(path: Path) -> list[str]:
    """The class names a classification run wrote to its adapter folder (``labels.json``)."""
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: --adapter must be the adapter folder of a text-classification "
            "run (a causal-lm run's adapter goes with `torchdora generate`)"
        )
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path} must hold a list of at least 2 class names, found {names!r:.80}")
    return names


def evaluate_saved(
    model: str | None,
    adapter: str | None,
    data: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    test_size: float = 0.2,
    split_seed: int = 0,
    max_length: int = 128,
) -> dict[str, float]:
    """Held-out metrics of a saved model/adapter: on ``data`` (all of it) if given, else on the
    bundled data's held-out split (the one ``run_finetune`` held out with the same settings)."""
    classifier, tokenizer, label_names, max_length = load_classifier(model, adapter, max_length)
    if data is None:
        _, test_data = train_test_split(load_bbc_news(), test_size, seed=split_seed)
    else:
        test_data = load_text_classification(data, text_column, label_column)
    if test_data.label_names != label_names:
        raise DataError(
            f"the data's labels {test_data.label_names} differ from the model's {label_names}"
        )
    examples = tokenize_classification(tokenizer, test_data, max_length)
    collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0)
    return evaluate_classification(classifier, examples, data_collator=collate)


def predict(
    model: str | None, adapter: str | None, texts: list[str], max_length: int = 128
) -> list[tuple[str, float]]:
    """``(label, probability)`` for each of ``texts``."""
    import torch

    classifier, tokenizer, label_names, max_length = load_classifier(model, adapter, max_length)
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = classifier(**encoded).logits.float().softmax(dim=-1)
    best = probs.max(dim=-1)
    return [(label_names[int(i)], float(p)) for p, i in zip(best.values, best.indices, strict=True)]
