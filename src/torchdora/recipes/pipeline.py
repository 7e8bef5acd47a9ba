"""The run pipeline every task shares: :func:`run_finetune` prepares the run folder and hands
the run to its task; the task's ``run`` composes the pieces below (quantize, adapt, train and
evaluate, write the run folder).

A run folder holds

* ``adapter/``: the adapter in PEFT's format (a full fine-tune has none);
* ``merged/``: the model with the adapter merged in, loadable by ``transformers`` alone;
* ``config.json``: the resolved settings; ``metrics.json``: the results;
* ``metrics.jsonl``: every log/eval record; ``decomposition.jsonl``: ΔM/ΔD per layer at each
  log step (for ``torchdora analyze``); ``checkpoint/``: what ``--resume`` continues from.
"""

from __future__ import annotations

import dataclasses
import json
import resource
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdora.analysis import DECOMPOSITION_FILE, DecompositionTracker
from torchdora.config import DoRAConfig
from torchdora.distributed import is_main_process
from torchdora.io import save_adapter, save_merged
from torchdora.io.files import not_a_folder
from torchdora.model import apply_dora, count_trainable_parameters
from torchdora.model.targeting import find_targets, name_matches
from torchdora.quantization import quantize_model
from torchdora.recipes.methods import METHODS
from torchdora.recipes.run_folder import run_folder
from torchdora.recipes.tasks import Log, get_task
from torchdora.train import Trainer, fit_max_length, pad_collate

if TYPE_CHECKING:
    from torch import nn

    from torchdora.recipes.settings import FinetuneConfig
    from torchdora.train.batch import Example


def run_finetune(config: FinetuneConfig, log: Log = print) -> dict[str, Any]:
    """Run ``config`` end to end; returns the results written to ``metrics.json``.

    Raises ``ValueError`` subclasses (``DataError``, ``ModelLoadError``, …) for unusable
    input; a run that fails leaves the output folder as it found it, or resumable (see
    :func:`torchdora.recipes.run_folder.run_folder`).

    In a distributed run (``torchrun``, see :class:`~torchdora.train.Trainer`) every rank
    trains; only rank 0 logs and writes the run folder.
    """
    task = get_task(config.task)
    if not is_main_process():
        log = _silent
    if config.resume and not Path(config.resume).is_dir():
        raise ValueError(
            f"--resume: checkpoint folder {config.resume} {not_a_folder(config.resume)}"
        )
    resume, overwrite = config.resume is not None, config.overwrite
    with run_folder(config.output, resume=resume, overwrite=overwrite) as output:
        return task.run(config, output, log)


def _silent(line: str) -> None:
    """The ``log`` of ranks other than 0."""


# ---------------------------------------------------------------------------- the model
def quantize_base(model: nn.Module, config: FinetuneConfig, keep: Iterable[str], log: Log) -> None:
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
    """Add ``config``'s adapters to ``model`` (``head`` trained in full), or for a full
    fine-tune unfreeze the modules they would adapt. Returns the modules whose ΔM/ΔD to track:
    ``None`` for every DoRA/LoRA layer, the unfrozen targets' names for a full fine-tune. Each
    of a list of target names must match a module (``apply_dora`` asks that one of them does)."""
    dora_config = config.dora_config(head)
    try:
        if isinstance(dora_config.target_modules, list):
            for name in dora_config.target_modules:  # raises, naming it, if it matches nothing
                find_targets(model, dataclasses.replace(dora_config, target_modules=[name]))
        if METHODS[config.method].adapter is None:
            return unfreeze_targets(model, dora_config)
        apply_dora(model, dora_config)
    except TypeError as err:  # targets of a kind no adapter exists for: a bad setting here
        raise ValueError(str(err)) from None
    return None


def unfreeze_targets(model: nn.Module, config: DoRAConfig) -> list[str]:
    """Full fine-tuning of what ``config`` would adapt: freeze ``model`` except the target
    modules and ``modules_to_save``; returns the target modules' names."""
    names = [target.name for target in find_targets(model, config)]
    model.requires_grad_(False)
    for name, module in model.named_modules():
        saved = config.modules_to_save and name_matches(config.modules_to_save, name)
        if name in names or saved:
            module.requires_grad_(True)
    return names


def describe_model(config: FinetuneConfig, model: nn.Module, name: str) -> str:
    """``DORA r=8 alpha=16 on NAME: 80,261 trainable of 22,795,402 parameters``."""
    trainable, total = count_trainable_parameters(model)
    return f"{config.describe_method()} on {name}: {trainable:,} trainable of {total:,} parameters"


def fitted_max_length(config: FinetuneConfig, model: nn.Module, tokenizer, log: Log) -> int:
    """``config.max_length`` cut to the positions ``model`` reads, saying so when it is cut."""
    max_length = fit_max_length(config.max_length, model, tokenizer)
    if max_length < config.max_length:
        log(
            f"max_length {config.max_length} is more than the model reads: texts are cut to "
            f"{max_length} tokens"
        )
    return max_length


# ---------------------------------------------------------------------------- training
def train_and_evaluate(
    config: FinetuneConfig,
    model: nn.Module,
    tokenizer,
    train_examples: Sequence[Example],
    test_examples: Sequence[Example],
    *,
    evaluate: Callable[..., dict[str, float]],
    describe: Callable[[str, dict[str, float]], str],
    analysed: list[str] | None,
    output: Path | None,
    log: Log,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate ``model`` on ``test_examples``, train it on ``train_examples`` with ``config``'s
    settings (resuming ``config.resume``) and evaluate it again; returns ``(before, summary)``:
    the metrics before training and :meth:`~torchdora.train.Trainer.train`'s summary (with the
    metrics after).

    Batches are padded with the tokenizer's pad token. ``evaluate(model, examples=…,
    data_collator=…, precision=…)`` is the task's evaluation (e.g.
    :func:`~torchdora.train.evaluate_classification`); ``describe(when, metrics)`` words its
    metrics before and after for the log. ΔM/ΔD of the modules ``analysed`` (see
    :func:`adapt_model`) go to ``output`` at every log step (:func:`decomposition_callbacks`)."""
    collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0)
    held_out = partial(
        evaluate, examples=test_examples, data_collator=collate, precision=config.precision
    )
    before = held_out(model)
    log(describe("before", before))
    trainer = Trainer(
        model,
        config.training_arguments(),
        train_examples,
        data_collator=collate,
        eval_fn=held_out,
        callbacks=decomposition_callbacks(
            model, output, analysed, resuming=config.resume is not None
        ),
    )
    summary = trainer.train(resume_from_checkpoint=config.resume)
    log(
        f"{describe('after', summary)} — {summary['step']} steps, "
        f"{summary['time_per_step_s']:.3f} s/step"
    )
    return before, summary


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


def run_statistics(model: nn.Module, summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of a finished run that every task's ``metrics.json`` holds, from the
    model's parameter counts and :meth:`~torchdora.train.Trainer.train`'s summary."""
    trainable, total = count_trainable_parameters(model)
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": summary["step"],
        "time_per_step_s": summary["time_per_step_s"],
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "train_runtime_s": summary["train_runtime_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ---------------------------------------------------------------------------- the run folder
def write_run(
    output: Path,
    config: FinetuneConfig,
    model: nn.Module,
    tokenizer,
    results: dict[str, Any],
    base_model_name_or_path: str,
    adapter_files: dict[str, str] | None = None,
) -> str:
    """Write a finished run's folder (see the module docstring) and return what it wrote, for
    the run's last log line. ``adapter_files`` (name → text) go into ``adapter/`` beside the
    adapter; a full fine-tune has no adapter, only the ``merged/`` model."""
    written = ""
    if METHODS[config.method].adapter is not None:
        adapter = save_adapter(
            model, output / "adapter", base_model_name_or_path=base_model_name_or_path
        )
        for name, text in (adapter_files or {}).items():
            (adapter / name).write_text(text)
        written = f"{adapter} (PEFT format), "
    tokenizer.save_pretrained(save_merged(model, output / "merged"))
    settings = json.dumps(config.recorded_settings(), indent=2)
    (output / "config.json").write_text(settings + "\n")
    (output / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return f"wrote {written}{output}/merged, metrics.json, config.json"
