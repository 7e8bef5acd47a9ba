"""Greedy chat generation with a causal LM and an optional DoRA adapter, behind
``torchdora generate``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchdora.io import load_adapter
from torchdora.io.files import read_config
from torchdora.model import merge_and_unload
from torchdora.recipes.classification import LABELS_FILE
from torchdora.train import load_causal_lm, render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_generator(
    model: str | None = None, adapter: str | None = None, *, merge: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` in eval mode: ``model`` (see
    :func:`~torchdora.train.load_causal_lm`) with ``adapter`` (a run's ``adapter/``
    folder) loaded on top, and merged into plain layers when ``merge``."""
    if merge and adapter is None:
        raise ValueError("--merge needs an --adapter to merge")
    if adapter is not None:  # a folder that is not a causal-LM adapter is refused before loading
        if (Path(adapter) / LABELS_FILE).is_file():
            raise ValueError(
                f"--adapter: {adapter} is a text-classification run's adapter (it has "
                f"{LABELS_FILE}); use it with `torchdora predict` or `torchdora evaluate`"
            )
        read_config(adapter)
    lm, tokenizer = load_causal_lm(model)
    if adapter is not None:
        load_adapter(lm, adapter)
        if merge:
            merge_and_unload(lm)
    return lm.eval(), tokenizer


@torch.no_grad()
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    streamer: Any = None,
) -> str:
    """The model's greedy answer to the user message ``prompt`` in its chat template.

    The prompt is tokenized as in training (template text, no extra special tokens).
    Generation stops at the model's end-of-turn/EOS token or after ``max_new_tokens``;
    ``streamer`` (e.g. ``transformers.TextStreamer``) receives the tokens as they come.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    text = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    encoded = encoded.to(next(model.parameters()).device)
    eos = model.generation_config.eos_token_id
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
