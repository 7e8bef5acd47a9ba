"""Held-out evaluation: a sequence classifier's mean cross-entropy and accuracy, a causal LM's
loss and perplexity on its labelled tokens."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from torchdora.train.batch import IGNORE_INDEX, Batch, Example, pad_collate, to_device
from torchdora.train.precision import autocast


def eval_batches(
    model: nn.Module,
    examples: Sequence[Example],
    data_collator: Callable[[Sequence[Example]], Batch],
    batch_size: int,
) -> Iterator[Batch]:
    """``examples`` collated ``batch_size`` at a time onto the model's device, with the model in
    eval mode (no dropout) until the iteration ends; the previous mode is restored after."""
    if not examples:
        raise ValueError("cannot evaluate on an empty set of examples")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            yield to_device(data_collator(examples[start : start + batch_size]), device)
    finally:
        model.train(was_training)


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
    are class indices.
    """
    loss_sum, correct = 0.0, 0
    for batch in eval_batches(model, examples, data_collator, batch_size):
        labels = batch.pop("labels")
        with autocast(precision, labels.device):
            logits = model(**batch).logits
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return {"eval_loss": loss_sum / len(examples), "eval_accuracy": correct / len(examples)}


@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    data_collator: Callable[[Sequence[Example]], Batch] = pad_collate,
    batch_size: int = 16,
    precision: str = "fp32",
) -> dict[str, float]:
    """``eval_loss`` (mean next-token cross-entropy over all labelled tokens of ``examples``,
    not a mean of per-batch means) and ``eval_perplexity`` (its exponential)."""
    loss_sum, count = 0.0, 0
    for batch in eval_batches(model, examples, data_collator, batch_size):
        labels = batch.pop("labels")[:, 1:]
        with autocast(precision, labels.device):
            logits = model(**batch).logits
        logits = logits[:, :-1].float()
        loss_sum += nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    loss = loss_sum / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
