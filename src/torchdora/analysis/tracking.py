"""ΔM/ΔD at checkpoints during training: a callable for the training loop to call every N steps."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from torchdora.analysis.records import append_jsonl, decomposition_record
from torchdora.analysis.reference import capture_reference, decomposition_change
from torchdora.model.ops import dora_modules


def infer_method(model: nn.Module) -> str:
    """``"DoRA"``, ``"DoRA (frozen m)"``, ``"DoRA (no norm)"``, ``"LoRA"``, ``"DoRA+LoRA"``
    (mixed), or ``"FT"`` (no adapter layers: a full fine-tune), from the model's active
    DoRA/LoRA adapters."""
    layers = [layer for _, layer in dora_modules(model)]
    if not layers:
        return "FT"
    if not any(layer.use_dora for layer in layers):
        return "LoRA"
    if not all(layer.use_dora for layer in layers):
        return "DoRA+LoRA"
    if not any(layer.normalize for layer in layers):
        return "DoRA (no norm)"
    if any(layer.magnitude.requires_grad for layer in layers):
        return "DoRA"
    return "DoRA (frozen m)"


class DecompositionTracker:
    """Records ``(ΔM, ΔD)`` of every analysed layer at the steps it is called with.

    Build it from the model as it starts training (before any resumed checkpoint is loaded: it
    snapshots the original weights, see :func:`~torchdora.analysis.capture_reference`), then
    call ``tracker(step, model)`` every N optimizer steps::

        tracker = DecompositionTracker(model, path=run_dir / DECOMPOSITION_FILE)
        ...
        if step % 100 == 0:
            tracker(step, model)

    Args:
        model: the model before training.
        method: the label of this run's panel in the plots; default :func:`infer_method`.
        modules: the modules to analyse; default every DoRA/LoRA layer (a full fine-tune has
            none: name the trained modules).
        path: if given, each record is appended to it as a line of JSON.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str | None = None,
        modules: Iterable[str] | None = None,
        path: str | os.PathLike | None = None,
    ) -> None:
        self.reference = capture_reference(model, modules)
        self.method = method or infer_method(model)
        self.path = path

    def __call__(self, step: int, model: nn.Module) -> dict[str, Any]:
        """The record of ``model`` at ``step`` (see :mod:`torchdora.analysis.records`)."""
        record = decomposition_record(
            step, self.method, decomposition_change(model, self.reference)
        )
        if self.path is not None:
            append_jsonl(self.path, record)
        return record
