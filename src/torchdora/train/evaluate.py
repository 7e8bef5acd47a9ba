"""Held-out evaluation of a sequence classifier: mean cross-entropy and accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchdora.train.batch import Batch, Example, pad_collate, to_device
from torchdora.train.precision import autocast


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    data_collator: Callable[[Sequence[Example]], Batch] = pad_collate,
    batch_size: int = 64,
    precision: str = "fp32",
) -> dict[str, float]:
    """``eval_loss`` (mean over examples) and ``eval_accuracy`` of ``model`` on ``examples``.

    ``model(**batch)`` must return ``logits`` of shape ``(batch, num_labels)``; ``labels``
    are class indices. Runs in eval mode (no dropout) and restores the previous mode.
    """
    if not examples:
        raise ValueError("cannot evaluate on an empty set of examples")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = to_device(data_collator(examples[start : start + batch_size]), device)
            labels = batch.pop("labels")
            with autocast(precision, device):
                logits = model(**batch).logits
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == labels).sum())
    finally:
        model.train(was_training)
    return {"eval_loss": loss_sum / len(examples), "eval_accuracy": correct / len(examples)}
