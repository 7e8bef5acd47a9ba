"""Resumable training checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint is a folder with

- ``trainable.safetensors``: every parameter with ``requires_grad`` (the adapter, heads in
  ``modules_to_save``, anything unfrozen), by its name in ``model.named_parameters()``;
- ``training_state.pt``: optimizer, lr scheduler and loss-scaler state, and the random
  number generators' state;
- ``trainer_state.json``: the optimizer step reached and whatever the caller adds.

The frozen base is not saved: resuming rebuilds the model the same way and loads this on top.
The folder is written next to its final place (``<name>.tmp``) and renamed into it, so an
interrupted save never leaves a half-written checkpoint: killed while writing, the previous
checkpoint is untouched; killed between moving the previous one aside (``<name>.old``) and
renaming the new one in, the next save or load moves the previous one back. A write error
(disk full, permission denied) removes the staging folder and raises :class:`CheckpointError`
with the previous checkpoint in place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from torchdora.train.seed import get_rng_state, set_rng_state

WEIGHTS_NAME = "trainable.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete or does not fit the model it is loaded into."""


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The parameters with ``requires_grad``, detached, by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    step: int,
    scaler: torch.amp.GradScaler | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of the run at optimizer step ``step`` to ``directory`` (replaced).

    ``trainer_state`` is stored, JSON-encoded, beside ``step`` (e.g. the training arguments).
    """
    directory = Path(directory)
    _recover_interrupted_save(directory)
    staging = directory.with_name(directory.name + ".tmp")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        weights = {name: t.contiguous() for name, t in trainable_state_dict(model).items()}
        save_file(weights, staging / WEIGHTS_NAME)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": get_rng_state(),
            },
            staging / TRAINING_STATE_NAME,
        )
        state = {"step": step, **(trainer_state or {})}
        (staging / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(staging, ignore_errors=True)
        kept = "; the previous checkpoint there is kept" if directory.is_dir() else ""
        reason = getattr(err, "strerror", None) or str(err)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {directory}: {reason}{kept}"
        ) from err
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _recover_interrupted_save(directory: Path) -> None:
    """Undo a save killed between its two renames: put ``<name>.old`` back as ``<name>``."""
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and (old / TRAINER_STATE_NAME).is_file():
        old.rename(directory)


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """``reader(path)``, with any failure to read or parse it as a :class:`CheckpointError`
    naming the file (safetensors, ``torch.load`` and ``json`` each fail in their own way)."""
    try:
        return reader(path)
    except Exception as err:  # a damaged file may fail anywhere inside a parser
        raise CheckpointError(f"{path} is damaged or unreadable ({err})") from err


def _json_object(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError('not a JSON object with an integer "step"')
    return state


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (``step`` and what the trainer stored)."""
    _recover_interrupted_save(Path(directory))
    path = Path(directory) / TRAINER_STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no {TRAINER_STATE_NAME}")
    return _read(path, _json_object)


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and the optimizer, scheduler, scaler and RNGs given).

    The model must have the same trainable parameters (names and shapes) as when it was
    saved. Returns the stored trainer state, with ``step``.
    """
    directory = Path(directory)
    _recover_interrupted_save(directory)
    missing = [
        name
        for name in (WEIGHTS_NAME, TRAINING_STATE_NAME, TRAINER_STATE_NAME)
        if not (directory / name).is_file()
    ]
    if missing:
        raise CheckpointError(f"{directory} is not a complete checkpoint: missing {missing}")
    # Everything is read before anything is loaded: a damaged file leaves the model as it was.
    trainer_state = read_trainer_state(directory)
    weights = _read(directory / WEIGHTS_NAME, load_file)
    state = _read(
        directory / TRAINING_STATE_NAME,
        lambda path: torch.load(path, map_location="cpu", weights_only=True),
    )
    params = dict(model.named_parameters())
    expected = trainable_state_dict(model)
    if set(weights) != set(expected):
        raise CheckpointError(
            f"{directory} does not fit this model: trainable parameters missing from the "
            f"checkpoint {sorted(set(expected) - set(weights))[:5]}, unexpected "
            f"{sorted(set(weights) - set(expected))[:5]}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{directory}: {name} has shape {tuple(tensor.shape)}, "
                f"the model's has {tuple(expected[name].shape)}"
            )
    if optimizer is not None:  # first: it checks the groups fit before it changes anything
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{directory}: the optimizer state does not fit this optimizer ({err}); it was "
                "saved with other parameter groups"
            ) from err
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if restore_rng:
        set_rng_state(state["rng"])
    return trainer_state


def check_checkpoint_dir(directory: Path, model: nn.Module) -> None:
    """Fail before the first step, not at the first save, if ``directory`` cannot take a
    checkpoint of ``model``: its parent is not a writable folder, or the disk has no room."""
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {err.strerror or err}"
        ) from None
    # the new checkpoint is staged beside the old one: room for one more is needed
    tensors = [p for p in model.parameters() if p.requires_grad]
    need = 3 * sum(p.numel() * p.element_size() for p in tensors)  # weights + Adam's two
    free = shutil.disk_usage(parent).free
    if free < need:
        raise CheckpointError(
            f"not enough disk space for checkpoints in {directory}: about "
            f"{need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free"
        )


#: what a resumed run must share with the run that saved the checkpoint: its data order and length
RESUME_KEYS = (
    "num_training_steps",
    "world_size",
    "train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)


def check_resumable(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a checkpoint whose trainer state ``saved`` (``num_training_steps``,
    ``world_size``, ``training_arguments``) differs from ``now`` in :data:`RESUME_KEYS`:
    resuming it would not continue that run."""

    def flat(state: dict[str, Any]) -> dict[str, Any]:
        world_size = state.get("world_size", 1)  # checkpoints from before DDP support
        return {
            "num_training_steps": state.get("num_training_steps"),
            **state.get("training_arguments", {}),
            "world_size": world_size,
        }

    before, after = flat(saved), flat(now)
    changed = [
        f"{k} {before.get(k)} -> {after[k]}" for k in RESUME_KEYS if before.get(k) != after[k]
    ]
    if changed:
        raise CheckpointError(
            f"the checkpoint was saved by a run with other settings ({', '.join(changed)}); "
            "resume with the settings it was saved with"
        )
