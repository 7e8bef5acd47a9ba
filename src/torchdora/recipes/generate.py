"""Greedy chat generation with a causal LM and DoRA adapters, behind ``torchdora generate``:
one prompt at a time with one adapter, or many prompts for several adapters in one
mixed-adapter batch."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchdora.io import load_adapter
from torchdora.io.files import read_config
from torchdora.layers.adapter import check_adapter_name
from torchdora.model import adapter_names, merge_and_unload, mixed_batch, set_adapter
from torchdora.recipes.classification import LABELS_FILE
from torchdora.train import load_causal_lm, render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    """``--adapter`` values as ``{name: folder}``: ``PATH`` is the adapter ``"default"``,
    ``NAME=PATH`` names it (each name once)."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not path:
            name, path = "default", value
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise ValueError(f"--adapter {value}: {err}") from None
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice; use NAME=PATH")
        adapters[name] = path
    return adapters


def load_generator(
    model: str | None = None,
    adapters: dict[str, str] | str | None = None,
    *,
    merge: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` in eval mode: ``model`` (see :func:`~torchdora.train.load_causal_lm`)
    with ``adapters`` (``{name: a run's adapter/ folder}``, or one folder) loaded on top, the
    first one active, and merged into plain layers when ``merge`` (one adapter only)."""
    if isinstance(adapters, str):
        adapters = {"default": adapters}
    adapters = adapters or {}
    if merge and len(adapters) != 1:
        raise ValueError("--merge needs exactly one --adapter to merge")
    for path in adapters.values():  # a folder that is not a causal-LM adapter: before loading
        if (Path(path) / LABELS_FILE).is_file():
            raise ValueError(
                f"--adapter: {path} is a text-classification run's adapter (it has "
                f"{LABELS_FILE}); use it with `torchdora predict` or `torchdora evaluate`"
            )
        read_config(path)
    lm, tokenizer = load_causal_lm(model)
    for name, path in adapters.items():
        load_adapter(lm, path, adapter_name=name)
    if adapters:
        set_adapter(lm, next(iter(adapters)))
        if merge:
            merge_and_unload(lm)
    return lm.eval(), tokenizer


def read_prompts(path: str | Path, adapters: list[str]) -> list[tuple[str | None, str]]:
    """``(adapter, prompt)`` per line of a JSONL file of ``{"adapter": name or null, "prompt":
    text}`` objects; every name must be one of ``adapters``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts: {path} does not exist")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompts: {path} line {number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where} is not JSON: {err}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{where} must be {{"adapter": name or null, "prompt": text}}')
        adapter = row.get("adapter")
        if adapter is not None and adapter not in adapters:
            raise ValueError(f"{where}: adapter {adapter!r} is not one of --adapter {adapters}")
        requests.append((adapter, row["prompt"]))
    if not requests:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return requests


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[tuple[str | None, str]],
    *,
    max_new_tokens: int = 64,
    on_answer: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Greedy answers to every ``(adapter, prompt)`` request, all in one mixed-adapter batch.

    Each row runs with its own adapter (``None``: the base model) under
    :func:`torchdora.mixed_batch`, the prompts left-padded to one length; ``on_answer(index,
    text)`` is called for each answer as soon as it is complete. The answers are those of
    :func:`generate_reply` with that adapter active.
    """
    _check_max_new_tokens(max_new_tokens)
    texts = [_user_turn(tokenizer, prompt) for _, prompt in requests]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side
    encoded = encoded.to(next(model.parameters()).device)
    eos = _end_tokens(model, tokenizer)
    streamer = _AnswerStreamer(tokenizer, eos, on_answer)
    names = [adapter for adapter, _ in requests]
    rows = mixed_batch(model, names) if adapter_names(model) else contextlib.nullcontext()
    with rows:
        model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=pad, streamer=streamer,
        )  # fmt: skip
    return streamer.answers


class _AnswerStreamer:
    """A ``generate`` streamer for a batch: collects each row's tokens and hands a row's answer
    on as soon as the row has produced its end-of-turn token (the rest at the end)."""

    def __init__(self, tokenizer, eos: int | list[int], on_answer) -> None:
        self.tokenizer, self.on_answer = tokenizer, on_answer
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.tokens: list[list[int]] | None = None  # None until the prompt has gone by
        self.done: set[int] = set()
        self.answers: list[str] = []

    def put(self, value: torch.Tensor) -> None:
        if self.tokens is None:  # the first call is the prompt
            self.tokens = [[] for _ in range(value.shape[0])]
            self.answers = [""] * value.shape[0]
            return
        for row, token in enumerate(value.reshape(len(self.tokens), -1)[:, -1].tolist()):
            if row in self.done:
                continue
            if token in self.eos:
                self._finish(row)
            else:
                self.tokens[row].append(token)

    def end(self) -> None:
        for row in range(len(self.tokens or [])):
            if row not in self.done:
                self._finish(row)

    def _finish(self, row: int) -> None:
        self.done.add(row)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True).strip()
        self.answers[row] = text
        if self.on_answer is not None:
            self.on_answer(row, text)


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
    _check_max_new_tokens(max_new_tokens)
    encoded = tokenizer(
        _user_turn(tokenizer, prompt), add_special_tokens=False, return_tensors="pt"
    )
    encoded = encoded.to(next(model.parameters()).device)
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=_end_tokens(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def _user_turn(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """``prompt`` as the user message in the model's chat template, tokenized as in training."""
    return render_prompt(tokenizer, [{"role": "user", "content": prompt}])


def _end_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | list[int]:
    """The token(s) that end an answer: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return eos if eos is not None else tokenizer.eos_token_id
