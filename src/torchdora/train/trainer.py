"""A small training loop for adapter fine-tuning: accumulation, clipping, mixed precision,
schedules, periodic evaluation, progress, and checkpoints that resume bit for bit."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from torchdora.distributed import all_reduce_sum, get_rank, get_world_size
from torchdora.train.arguments import TrainingArguments
from torchdora.train.batch import (
    Batch,
    Example,
    count_loss_items,
    count_tokens,
    epoch_batches,
    pad_collate,
    shifts_labels,
    to_device,
)
from torchdora.train.checkpoint import (
    check_checkpoint_dir,
    check_resumable,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from torchdora.train.optim import create_optimizer
from torchdora.train.precision import autocast, grad_scaler, resolve_precision
from torchdora.train.progress import ProgressReporter
from torchdora.train.schedule import get_scheduler
from torchdora.train.seed import set_seed
from torchdora.train.stopping import StopSignals, TrainingInterrupted


def model_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The default loss: ``model(**batch).loss`` (``transformers`` models with ``labels``)."""
    return model(**batch).loss


class _LogWindow:
    """The steps since the last log record: their losses are summed on the device, so a step
    does not wait for the device to report its loss (in one process; DDP reduces each step's
    loss with the stop flag anyway)."""

    def __init__(self) -> None:
        self.loss_sum: Tensor | float = 0.0
        self.steps = self.tokens = 0
        self.time = 0.0

    def add(self, loss: Tensor | float, tokens: int) -> None:
        self.loss_sum = self.loss_sum + loss
        self.steps, self.tokens = self.steps + 1, self.tokens + int(tokens)

    def mean_loss(self) -> float:
        return float(self.loss_sum) / self.steps


class Trainer:
    """Trains the parameters of ``model`` that have ``requires_grad``.

    One optimizer step consumes ``gradient_accumulation_steps`` micro-batches; each
    micro-batch's mean loss is weighted by its share of the step's loss items
    (``count_items``), so the step's gradient equals that of one big batch even when the
    last micro-batch of an epoch is smaller.

    Args:
        model: the model, with its adapters in place and the rest frozen.
        args: the :class:`TrainingArguments`.
        train_dataset: examples, indexable (``train_dataset[i]``) and sized.
        data_collator: turns a list of examples into a batch of tensors.
        eval_fn: ``eval_fn(model) -> {"eval_…": value}``, run every ``eval_steps`` and at
            the end (e.g. a ``functools.partial`` of
            :func:`~torchdora.train.evaluate_classification`).
        compute_loss: ``compute_loss(model, batch)``, the mean loss over the batch's items.
        count_items: ``count_items(batch)``, how many items that mean is over (default: the
            labels that are not ``-100``, but for the first of each row where the model is a
            causal LM, see :func:`~torchdora.train.batch.count_loss_items`).
        optimizer: default AdamW over :func:`~torchdora.train.get_parameter_groups`.
        lr_scheduler: default warmup + ``args.lr_scheduler_type``.
        callbacks: each called with every log and eval record (a dict with ``step``), on
            rank 0 only.

    A log record has ``step``, ``epoch``, ``loss`` (mean over the steps since the previous
    record), ``lr`` (of the first parameter group: ``lora_A``'s), ``grad_norm`` (before
    clipping) and ``tokens_per_s`` (non-padding input tokens); an eval record has ``step``
    and what ``eval_fn`` returned.

    Under ``torchrun`` (a default process group initialised, e.g. by
    :func:`~torchdora.distributed.init_from_environment`) the model is wrapped in
    ``DistributedDataParallel`` and each micro-batch of ``train_batch_size`` examples per
    process is a strided share of one global batch of ``train_batch_size × world_size`` from
    the seeded order (padded, as ``DistributedSampler`` does, to a multiple of the world
    size). The loss is weighted by the items of the whole global batch, so a step's gradient
    equals that of one process on the global batch; logged losses and throughput are of all
    ranks; only rank 0 reports progress, calls ``callbacks`` and writes checkpoints; a stop
    signal on any rank stops all of them after the same step. ``eval_fn`` runs on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        train_dataset: Sequence[Example],
        *,
        data_collator: Callable[[Sequence[Example]], Batch] = pad_collate,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        compute_loss: Callable[[nn.Module, Batch], Tensor] = model_loss,
        count_items: Callable[[Batch], int] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        if len(train_dataset) == 0:
            raise ValueError("the training set is empty")
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(args.precision, self.device)
        self.model = model.to(self.device)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main_process = self.rank == 0
        #: what the training forward runs: ``model`` itself, or its DDP wrapper
        self.model_wrapped = DistributedDataParallel(model) if self.world_size > 1 else model
        self.train_dataset = train_dataset
        self.data_collator = data_collator
        self.eval_fn = eval_fn
        self.compute_loss = compute_loss
        self.count_items = count_items or partial(count_loss_items, shifted=shifts_labels(model))
        self.callbacks = list(callbacks)
        self.global_batch_size = args.train_batch_size * self.world_size
        self.steps_per_epoch = math.ceil(
            math.ceil(len(train_dataset) / self.global_batch_size)
            / args.gradient_accumulation_steps
        )
        self.num_training_steps = args.max_steps or self.steps_per_epoch * args.num_train_epochs
        if optimizer is None:
            optimizer = create_optimizer(
                model,
                args.learning_rate,
                magnitude_lr=args.magnitude_lr,
                magnitude_lr_ratio=args.magnitude_lr_ratio,
                loraplus_lr_ratio=args.loraplus_lr_ratio,
                weight_decay=args.weight_decay,
                magnitude_weight_decay=args.magnitude_weight_decay,
            )
        if lr_scheduler is None:
            lr_scheduler = get_scheduler(
                optimizer,
                args.lr_scheduler_type,
                num_warmup_steps=math.ceil(args.warmup_ratio * self.num_training_steps),
                num_training_steps=self.num_training_steps,
                min_lr_ratio=args.min_lr_ratio,
            )
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.scaler = grad_scaler(self.precision, self.device)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.step = 0
        self._progress: ProgressReporter | None = None
        self._signals = StopSignals(self._interrupted_now)

    # ------------------------------------------------------------------ one optimizer step
    def micro_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step ``step`` (0-based), from the seeded
        order: all of each global batch in one process, a strided share of it under DDP."""
        epoch, index = divmod(step, self.steps_per_epoch)
        batches = epoch_batches(
            len(self.train_dataset),
            self.global_batch_size,
            self.args.seed,
            epoch,
            pad_to_multiple_of=self.world_size,
        )
        accumulation = self.args.gradient_accumulation_steps
        window = batches[index * accumulation : (index + 1) * accumulation]
        return [
            self.data_collator([self.train_dataset[i] for i in ids[self.rank :: self.world_size]])
            for ids in window
        ]

    def accumulate_gradients(self, micro_batches: Sequence[Batch]) -> Tensor:
        """Forward and backward over ``micro_batches`` into ``.grad``; returns this rank's share
        of the mean loss (the mean loss itself in one process).

        The gradients are those of the mean loss over all items of all micro-batches (of every
        rank: DDP averages the ranks' gradients, so each weighs its items by ``world_size``).
        The shares of all ranks sum to the mean loss; :meth:`train` adds them up together with
        its other per-step sums, in one collective.
        """
        counts = [self.count_items(batch) for batch in micro_batches]
        (total,) = all_reduce_sum(sum(counts))
        if total == 0:
            raise ValueError(
                f"optimizer step {self.step + 1} has no item to learn from: every label of its "
                f"batches is -100 (ignored)"
            )
        loss_sum = torch.zeros((), device=self.device)
        last = len(micro_batches) - 1
        for i, (batch, count) in enumerate(zip(micro_batches, counts, strict=True)):
            syncing = i == last or self.world_size == 1  # DDP all-reduces on the last only
            with nullcontext() if syncing else self.model_wrapped.no_sync():
                with autocast(self.precision, self.device):
                    loss = self.compute_loss(self.model_wrapped, to_device(batch, self.device))
                if not isinstance(loss, Tensor):
                    raise ValueError(
                        f"compute_loss returned {loss!r}, not a loss tensor: with the default, "
                        "model(**batch).loss, the examples need 'labels'"
                    )
                self.scaler.scale(loss * (count * self.world_size / total)).backward()
            loss_sum += loss.detach().float() * count
        return loss_sum / total

    def optimizer_step(self) -> Tensor:
        """Unscale, clip to ``max_grad_norm``, step, advance the schedule; returns the norm
        before clipping."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: str | Path | None = None) -> dict[str, Any]:
        """Run to ``num_training_steps``.

        Returns a summary: ``step``, ``train_runtime_s`` (wall time, evaluations included),
        ``time_per_step_s`` and ``train_tokens_per_s`` (training steps only), and the
        metrics of the last evaluation.

        With ``resume_from_checkpoint`` the model, optimizer, schedule, RNGs and step are
        restored first, so the run continues exactly as if it had never stopped.

        SIGINT and SIGTERM (caught only while ``train`` runs, and only in the main thread;
        the previous handlers are restored after) let the current optimizer step finish,
        save a checkpoint of it to ``checkpoint_dir`` and raise :class:`TrainingInterrupted`.
        A second signal stops at once; the checkpoint writer is atomic, so the last complete
        checkpoint is kept. The checkpoint folder is checked (writable, room for one more
        checkpoint) before the first step.
        """
        if self.args.checkpoint_dir and self.is_main_process:
            check_checkpoint_dir(Path(self.args.checkpoint_dir), self.model)
        if resume_from_checkpoint is not None:
            check_resumable(read_trainer_state(resume_from_checkpoint), self._trainer_state())
            state = load_checkpoint(
                resume_from_checkpoint,
                self.model,
                self.optimizer,
                self.lr_scheduler,
                scaler=self.scaler,
            )
            self.step = state["step"]
        else:
            set_seed(self.args.seed)
        first_step = self.step
        self._progress = ProgressReporter(
            self.num_training_steps,
            first_step,
            mode=self.args.progress if self.is_main_process else "none",
            metrics_file=self.args.metrics_file if self.is_main_process else None,
        )
        self.model.train()
        start = time.perf_counter()
        window = _LogWindow()
        total_tokens, total_time = 0, 0.0  # in training steps only, not evaluation or saving
        eval_metrics: dict[str, float] = {}
        saved_step = None  # the step of the last checkpoint this call wrote
        resumed = time.perf_counter()  # training time runs from here to the next pause
        try:
            with self._signals:
                while self.step < self.num_training_steps:
                    batches = self.micro_batches(self.step)
                    loss = self.accumulate_gradients(batches)
                    grad_norm = self.optimizer_step()
                    tokens = sum(count_tokens(b) for b in batches)
                    stopping = self._signals.signum is not None
                    if self.world_size > 1:  # the step's one collective of its own
                        loss, tokens, stops = all_reduce_sum(loss.item(), tokens, stopping)
                        stopping = stops > 0
                    window.add(loss, tokens)
                    self.step += 1
                    self._progress.update()
                    last = self.step == self.num_training_steps
                    log = last or self._due(self.args.logging_steps)
                    evaluate = self.eval_fn is not None and (
                        last or self._due(self.args.eval_steps)
                    )
                    save = bool(self.args.checkpoint_dir) and (
                        last or self._due(self.args.save_steps)
                    )
                    paused = log or evaluate or save
                    if paused:  # count the training time up to here
                        window.time += self._time_since(resumed)
                    if log:
                        self._emit(self._log_record(window, grad_norm))
                        total_tokens += window.tokens
                        total_time += window.time
                        window = _LogWindow()
                    if evaluate:
                        eval_metrics = self.evaluate()
                    if save:
                        self.save_checkpoint(self.args.checkpoint_dir)
                        saved_step = self.step
                    if self._stop_requested(stopping):
                        self._stop(saved_step)
                    if paused:
                        resumed = time.perf_counter()
        finally:
            self._progress.close()
            self._progress = None
        if self.eval_fn is not None and self.step == first_step:  # resumed at the last step
            eval_metrics = self.evaluate()
        steps = self.step - first_step
        return {
            "step": self.step,
            "train_runtime_s": time.perf_counter() - start,
            "time_per_step_s": total_time / steps if steps else 0.0,
            "train_tokens_per_s": total_tokens / total_time if steps else 0.0,
            **eval_metrics,
        }

    def _log_record(self, window: _LogWindow, grad_norm: Tensor) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": window.mean_loss(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": window.tokens / window.time,
        }

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` on the model now and report its metrics."""
        if self.eval_fn is None:
            raise ValueError("this Trainer has no eval_fn")
        training = self.model.training
        metrics = self.eval_fn(self.model)
        self.model.train(training)  # eval_fn may have switched dropout off
        self._emit({"step": self.step, **metrics})
        return metrics

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write a resumable checkpoint of the run as it is now (rank 0 writes; the ranks hold
        the same values)."""
        if not self.is_main_process:
            return Path(directory)
        return save_checkpoint(
            directory,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            step=self.step,
            scaler=self.scaler,
            trainer_state=self._trainer_state(),
        )

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint records of the run beside its step (see :func:`check_resumable`)."""
        return {
            "num_training_steps": self.num_training_steps,
            "world_size": self.world_size,
            "training_arguments": self.args.to_dict(),
        }

    # ------------------------------------------------------------------ faults
    def _interrupted_now(self, signum: int) -> TrainingInterrupted:
        """What a second stop signal raises: the last complete checkpoint, if any, is kept."""
        folder = Path(self.args.checkpoint_dir) if self.args.checkpoint_dir else None
        return TrainingInterrupted(
            signum, self.step, folder if folder and folder.is_dir() else None
        )

    def _stop_requested(self, any_rank_stopping: bool) -> bool:
        """Whether to stop after this step. ``any_rank_stopping`` is whether any rank had a
        stop signal when the step's sums were reduced: the ranks must stop after the same step,
        so a signal arriving later counts at the next step, except in a single process."""
        if any_rank_stopping and self._signals.signum is None:
            self._signals.signum = signal.SIGTERM  # another rank's signal, e.g. from torchrun
        return any_rank_stopping or (self.world_size == 1 and self._signals.signum is not None)

    def _stop(self, saved_step: int | None) -> None:
        """Checkpoint the last completed step (unless just done) and raise
        :class:`TrainingInterrupted`."""
        assert self._signals.signum is not None
        checkpoint = None
        if self.args.checkpoint_dir:
            checkpoint = Path(self.args.checkpoint_dir)
            if saved_step != self.step:
                self.save_checkpoint(checkpoint)
        raise TrainingInterrupted(self._signals.signum, self.step, checkpoint)

    def _time_since(self, resumed: float) -> float:
        """Seconds from ``resumed`` until the device has finished the work queued so far
        (CUDA runs ahead of Python: without the sync, only the kernels' launch is timed)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - resumed

    def _due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.is_main_process:
            return
        if self._progress is not None:
            self._progress.log(record)
        for callback in self.callbacks:
            callback(record)
