"""From examples to padded tensor batches, and the shuffled order a resumable run needs.

An *example* is a dict of token-id lists (``input_ids``, ``attention_mask``, …) and a
``labels`` entry: an int for sequence classification, a list of ids (``-100`` = ignored) for
token-level tasks. :func:`pad_collate` pads either kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchdora.train.data import TextClassificationData

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Example = dict[str, Any]
Batch = dict[str, Tensor]
IGNORE_INDEX = -100


def check_max_length(max_length: int) -> None:
    """Refuse a ``max_length`` no text can be cut to (a classifier needs [CLS] and [SEP])."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


def fit_max_length(max_length: int, model: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    """``max_length`` cut to what ``model`` can read: its ``max_position_embeddings`` and the
    tokenizer's ``model_max_length`` (RoBERTa's 514 positions hold 512 tokens)."""
    limits = (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
    return min([max_length, *(limit for limit in limits if isinstance(limit, int))])


def tokenize_classification(
    tokenizer: PreTrainedTokenizerBase, data: TextClassificationData, max_length: int = 128
) -> list[Example]:
    """Tokenize ``data`` (truncating to ``max_length`` tokens) into examples with ``labels``."""
    check_max_length(max_length)
    encoded = tokenizer(data.texts, truncation=True, max_length=max_length)
    keys = [k for k in tokenizer.model_input_names if k in encoded]
    return [
        {**{k: encoded[k][i] for k in keys}, "labels": label} for i, label in enumerate(data.labels)
    ]


def pad_collate(examples: Sequence[Example], pad_token_id: int = 0) -> Batch:
    """Stack ``examples`` into tensors, right-padding every list to the longest in the batch.

    ``input_ids`` are padded with ``pad_token_id``, list-valued ``labels`` with ``-100``
    (ignored by the loss), anything else (``attention_mask``, ``token_type_ids``) with 0.
    """
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if not isinstance(values[0], list | tuple):
            batch[key] = torch.tensor(values)
            continue
        pad = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        width = max(len(v) for v in values)
        batch[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values])
    return batch


def count_loss_items(batch: Batch) -> int:
    """How many terms a mean loss over ``batch`` averages: labels that are not ``-100``.

    One per example for classification, one per target token for token-level labels; the
    batch size when there are no labels. Gradient accumulation weights micro-batches by it.
    """
    labels = batch.get("labels")
    if labels is None:
        return len(next(iter(batch.values())))
    return int((labels != IGNORE_INDEX).sum())


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) input tokens in ``batch``, for throughput."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, pad_to_multiple_of: int = 1
) -> list[list[int]]:
    """The example indices of each batch of ``epoch``: a permutation that depends only on
    ``(seed, epoch)``, cut into batches of ``batch_size`` (the last may be smaller).

    ``pad_to_multiple_of``: repeat the order's first indices until its length is a multiple of
    this (the number of processes that split every batch), so that no process's share of the
    last batch is empty. A run that resumes mid-epoch recomputes the same order and skips what
    it has done.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    missing = -len(order) % pad_to_multiple_of
    order += (order * missing)[:missing]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}
