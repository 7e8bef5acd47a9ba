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
        values = [ex[key].tolist() if isinstance(ex[key], Tensor) else ex[key] for ex in examples]
        if isinstance(values[0], list | tuple):
            pad = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            width = max(len(v) for v in values)
            values = [list(v) + [pad] * (width - len(v)) for v in values]
        try:
            batch[key] = torch.tensor(values)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"the examples' {key!r} must be numbers or lists of numbers (labels as class "
                f"indices), got {values[0]!r:.60}: {err}"
            ) from None
    return batch


def count_loss_items(batch: Batch, shifted: bool = False) -> int:
    """How many terms a mean loss over ``batch`` averages: labels that are not ``-100``.

    One per example for classification, one per target token for token-level labels; the
    batch size when there are no labels. ``shifted``: the loss predicts token ``t + 1`` from
    token ``t`` and so never uses each row's first label (a causal LM, see
    :func:`shifts_labels`). Gradient accumulation weights micro-batches by it.
    """
    labels = batch.get("labels")
    if labels is None:
        return len(next(iter(batch.values())))
    if shifted and labels.dim() > 1:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def shifts_labels(model: Any) -> bool:
    """Whether ``model(**batch).loss`` averages over ``labels[..., 1:]``: a decoder-only
    ``transformers`` language model, which shifts the labels itself."""
    can_generate = getattr(model, "can_generate", None)
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return callable(can_generate) and bool(can_generate()) and not is_encoder_decoder


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
