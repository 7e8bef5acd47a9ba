"""Instruction data for causal-LM fine-tuning: conversations from the bundled ChatterBot corpus
or a JSONL file, a held-out split by prompt, and chat-template tokenization whose labels cover
only the assistant's tokens.

A *conversation* is a list of chat messages ``{"role": …, "content": …}`` as chat templates
take them; roles are ``system``, ``user`` and ``assistant``.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdora.train.batch import IGNORE_INDEX, Example
from torchdora.train.data import DataError, read_json_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
CHATTERBOT_PACKAGE = "chatterbot_corpus"
CHATTERBOT_DISTRIBUTION = "chatterbot-corpus"


def load_chatterbot_corpus(language: str = "english") -> list[Conversation]:
    """The ChatterBot corpus (BSD-3-Clause; ``chatterbot-corpus`` on PyPI): short dialogues
    in YAML files by topic (AI, trivia, greetings, coding…).

    Reads the package's YAML files without importing it. Each dialogue's lines alternate
    user/assistant, starting with the user. Exact duplicates are dropped (the English
    ``tech_support`` file repeats most of its dialogues), leaving 899 English dialogues.
    """
    import yaml

    spec = importlib.util.find_spec(CHATTERBOT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default causal-LM data needs the {CHATTERBOT_DISTRIBUTION!r} package: "
            f"pip install {CHATTERBOT_DISTRIBUTION} (or torchdora[train])"
        )
    root = Path(spec.submodule_search_locations[0]) / "data" / language
    if not root.is_dir():
        raise DataError(f"{root} is missing: no {language!r} ChatterBot corpus")
    seen: set[tuple[str, ...]] = set()
    conversations = []
    for file in sorted(root.glob("*.yml")):
        for lines in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations") or []:
            lines = tuple(str(line).strip() for line in lines)
            if len(lines) >= 2 and lines not in seen:
                seen.add(lines)
                roles = ("user", "assistant")
                conversations.append(
                    [{"role": roles[i % 2], "content": text} for i, text in enumerate(lines)]
                )
    return conversations


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read a JSON Lines file (or a ``.json`` list) of conversations.

    Each row is either ``{"prompt": str, "response": str}`` (one user turn and its answer) or
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, …]}`` with at
    least one assistant message.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        raise DataError(f"{path}: causal-LM data must be a .jsonl or .json file")
    rows, _ = read_json_rows(path)
    conversations = [_conversation(row, f"{path}, row {number}") for number, row in rows]
    if not conversations:
        raise DataError(f"{path} has no examples")
    return conversations


def _conversation(row: dict[str, Any], where: str) -> Conversation:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(
                f"{where}: 'messages' must be a list of {{'role', 'content'}} objects "
                f"with roles {', '.join(ROLES)}"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(
            f"{where}: needs 'prompt' and 'response' strings or a 'messages' list, "
            f"got keys {sorted(row)}"
        )
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def first_prompt(conversation: Conversation) -> str:
    """The first user message: what a held-out example is asked."""
    return next((m["content"] for m in conversation if m["role"] == "user"), "")


def split_conversations(
    conversations: Sequence[Conversation], test_size: float = 0.1, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """A deterministic ``(train, test)`` split that keeps every conversation opening with the
    same prompt on one side, so a held-out question was never trained on (the ChatterBot
    corpus answers many questions several ways)."""
    if not 0.0 < test_size < 1.0:
        raise DataError(f"test_size must be in (0, 1), got {test_size}")
    prompts = sorted({first_prompt(c) for c in conversations})
    if len(prompts) < 2:
        raise DataError(
            f"{len(conversations)} conversations with {len(prompts)} distinct first prompts "
            "cannot be split into train and held-out parts; add examples"
        )
    random.Random(seed).shuffle(prompts)
    count = min(max(round(test_size * len(prompts)), 1), len(prompts) - 1)
    held_out = set(prompts[:count])
    train = [c for c in conversations if first_prompt(c) not in held_out]
    test = [c for c in conversations if first_prompt(c) in held_out]
    return train, test


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> str:
    """``messages`` in the chat template, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, max_length: int
) -> Example:
    """``input_ids``, ``attention_mask`` and ``labels`` of one conversation in the chat template.

    ``labels`` equal ``input_ids`` on the assistant messages' tokens (each with the template's
    end-of-turn text) and are ``-100`` everywhere else: the loss is the answers' alone. The
    template is rendered up to each answer and through it; the pieces are tokenized one by one,
    as generation sees them (the prompt first, then the answer's tokens). The ids are cut at
    ``max_length``.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i])
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as a prefix of "
                "its continuation; cannot tell prompt tokens from response tokens"
            )
        for text, trained in ((prompt[len(done) :], False), (full[len(prompt) :], True)):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        done = full
    return {
        "input_ids": ids[:max_length],
        "attention_mask": [1] * min(len(ids), max_length),
        "labels": labels[:max_length],
    }


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation], max_length: int
) -> list[Example]:
    """:func:`tokenize_conversation` for each; drops those whose answers lie wholly past
    ``max_length`` (nothing to learn). Raises :class:`DataError` if none is left."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples = [tokenize_conversation(tokenizer, c, max_length) for c in conversations]
    examples = [ex for ex in examples if any(y != IGNORE_INDEX for y in ex["labels"][1:])]
    if not examples:
        raise DataError(
            f"no conversation has an answer within the first {max_length} tokens; "
            "raise --max-length"
        )
    return examples
