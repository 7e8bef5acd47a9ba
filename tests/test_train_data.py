"""Data loading, splitting, tokenisation/batching and model loading for the main job."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch

from torchdora.train import (
    DataError,
    ModelLoadError,
    TextClassificationData,
    bundled_model_path,
    epoch_batches,
    load_bbc_news,
    load_sequence_classifier,
    load_text_classification,
    pad_collate,
    sample_per_class,
    tokenize_classification,
    train_test_split,
)
from torchdora.train.batch import count_loss_items

ROWS = [("good film", "pos"), ("bad plot", "neg"), ("fine cast", "pos"), ("dull", "neg")]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- user files
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_load_each_format(tmp_path, suffix):
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        body = "\n".join(f'"{t}"{sep}{y}' for t, y in ROWS)
        path = write(tmp_path / f"d{suffix}", f"sentence{sep}sentiment\n{body}\n")
    elif suffix == ".jsonl":
        lines = [
            json.dumps({"sentence": t, "sentiment": y, "id": i}) for i, (t, y) in enumerate(ROWS)
        ]
        path = write(tmp_path / "d.jsonl", "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))
    else:
        path = write(
            tmp_path / "d.json", json.dumps([{"sentence": t, "sentiment": y} for t, y in ROWS])
        )
    data = load_text_classification(path, text_column="sentence", label_column="sentiment")
    assert data.texts == [t for t, _ in ROWS]
    assert data.label_names == ["neg", "pos"]
    assert [data.label_names[y] for y in data.labels] == [y for _, y in ROWS]


def test_integer_labels_keep_numeric_order(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": y}) for i, y in enumerate([10, 2, 0, 2])]
    data = load_text_classification(write(tmp_path / "d.jsonl", "\n".join(lines)))
    assert data.label_names == ["0", "2", "10"]
    assert data.labels == [2, 1, 0, 1]


FIRST = '{"text": "a", "label": 1}\n'


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("missing.csv", None, {}, "data file not found"),
        ("d.txt", "text,label\na,b\n", {}, "unsupported data file type '.txt'"),
        (
            "d.csv",
            "body,label\na,x\n",
            {},
            "no text column 'text'; its columns are 'body', 'label'",
        ),
        ("d.csv", "text,label\na,x\n", {"label_column": "topic"}, "no label column 'topic'"),
        ("d.csv", "text,label\n", {}, "has no examples"),
        ("d.csv", "", {}, "no text column 'text'; its columns are none"),
        ("d.csv", "text,label\na,x\nb,x\n", {}, "a single label ('x'); classification needs"),
        ("d.csv", "text,label\na,x\nb,\nc,y\n", {}, "row 3: 'label' must be"),
        ("d.csv", "text,label\na,x\nb\n", {}, "row 3: 'label' must be"),
        ("d.jsonl", FIRST + '{"text": "b", "label": 2\n', {}, "line 2 is not valid JSON"),
        ("d.jsonl", FIRST + "[1, 2]\n", {}, "row 2: expected a JSON object"),
        ("d.jsonl", FIRST + '{"text": 5, "label": 2}\n', {}, "row 2: 'text' is missing"),
        ("d.jsonl", FIRST + '{"text": "b", "label": 0.5}\n', {}, "row 2: 'label' must be"),
    ],
)
def test_bad_data_files(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_text_classification(path, **kwargs)


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_data_file_that_is_not_utf8_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("text,label\ncafé,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name} is not UTF-8 text"):
        load_text_classification(path)


# --------------------------------------------------------------------------- split
def labelled(counts: dict[str, int]) -> TextClassificationData:
    names = sorted(counts)
    labels = [i for i, name in enumerate(names) for _ in range(counts[name])]
    return TextClassificationData([f"text {i}" for i in range(len(labels))], labels, names)


def test_split_is_stratified_deterministic_and_disjoint():
    data = labelled({"a": 50, "b": 30, "c": 3})
    train, test = train_test_split(data, test_size=0.2, seed=7)
    again_train, again_test = train_test_split(data, test_size=0.2, seed=7)
    _, other_test = train_test_split(data, test_size=0.2, seed=8)
    assert (train.texts, test.texts) == (again_train.texts, again_test.texts)
    assert test.texts != other_test.texts
    assert set(train.texts).isdisjoint(test.texts)
    assert sorted(train.texts + test.texts) == sorted(data.texts)
    per_label = collections.Counter(test.label_names[y] for y in test.labels)
    assert per_label == {"a": 10, "b": 6, "c": 1}
    assert train.label_names == test.label_names == data.label_names


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1])
def test_split_rejects_bad_test_size(test_size):
    with pytest.raises(DataError, match="test_size"):
        train_test_split(labelled({"a": 5, "b": 5}), test_size=test_size)


def test_split_needs_enough_examples():
    with pytest.raises(DataError, match="cannot split"):
        train_test_split(labelled({"a": 1, "b": 1}), test_size=0.2)


def test_sample_per_class_takes_k_of_each_label_by_seed():
    data = labelled({"a": 50, "b": 30, "c": 7})
    sample = sample_per_class(data, 5, seed=3)
    per_label = collections.Counter(sample.label_names[y] for y in sample.labels)
    assert per_label == {"a": 5, "b": 5, "c": 5}
    assert sample.label_names == data.label_names
    positions = [data.texts.index(text) for text in sample.texts]
    assert positions == sorted(positions)  # the original order
    assert all(data.labels[i] == y for i, y in zip(positions, sample.labels, strict=True))
    assert sample_per_class(data, 5, seed=3).texts == sample.texts
    assert sample_per_class(data, 5, seed=4).texts != sample.texts
    whole = sample_per_class(data, 7, seed=0)  # every example of the smallest label
    assert {t for t, y in zip(whole.texts, whole.labels, strict=True) if y == 2} == {
        t for t, y in zip(data.texts, data.labels, strict=True) if y == 2
    }


@pytest.mark.parametrize(
    ("per_class", "message"),
    [
        (0, "train_per_class must be a positive integer, got 0"),
        (-2, "train_per_class must be a positive integer, got -2"),
        (8, "train_per_class is 8 but label 'c' has only 7 training examples: choose at most 7"),
    ],
)
def test_sample_per_class_rejects_bad_counts(per_class, message):
    with pytest.raises(DataError, match=re.escape(message)):
        sample_per_class(labelled({"a": 50, "b": 30, "c": 7}), per_class)


# --------------------------------------------------------------------------- the default data
def test_bbc_news():
    data = load_bbc_news()
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data) == 2127  # 2,225 articles less 98 exact duplicates
    assert len(set(data.texts)) == len(data)
    counts = collections.Counter(data.label_names[y] for y in data.labels)
    assert counts == {
        "business": 503,
        "entertainment": 369,
        "politics": 403,
        "sports": 505,
        "tech": 347,
    }
    first_tech = data.texts[data.labels.index(data.label_names.index("tech"))]
    assert first_tech.startswith("Ink helps drive democracy in Asia\n\nThe Kyrgyz Republic")
    assert all("\ufffd" not in t for t in data.texts)  # the one cp1252 file decodes cleanly


# --------------------------------------------------------------------------- batching
def test_pad_collate_pads_each_kind():
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 2},
        {"input_ids": [8], "attention_mask": [1], "labels": 0},
    ]
    batch = pad_collate(examples, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]
    token_level = pad_collate(
        [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [-100]}]
    )
    assert token_level["labels"].tolist() == [[1, 2], [-100, -100]]
    assert count_loss_items(batch) == 2 and count_loss_items(token_level) == 2


def test_epoch_batches_are_seeded_permutations():
    first = epoch_batches(10, 4, seed=0, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first == epoch_batches(10, 4, seed=0, epoch=0)
    assert first != epoch_batches(10, 4, seed=0, epoch=1)
    assert first != epoch_batches(10, 4, seed=1, epoch=0)


@pytest.mark.parametrize(("num_examples", "ranks"), [(10, 4), (3, 4), (8, 4), (1, 3)])
def test_epoch_batches_padded_for_ranks_give_every_rank_a_share(num_examples, ranks):
    plain = [i for b in epoch_batches(num_examples, 4, seed=0, epoch=0) for i in b]
    padded = epoch_batches(num_examples, 4, seed=0, epoch=0, pad_to_multiple_of=ranks)
    order = [i for b in padded for i in b]
    assert len(order) % ranks == 0 and len(order) - num_examples < ranks
    assert order[:num_examples] == plain  # the same order, then repeats from its start
    assert order[num_examples:] == (plain * ranks)[: len(order) - num_examples]
    assert all(len(batch[rank::ranks]) > 0 for batch in padded for rank in range(ranks))


def test_tokenize_classification_with_the_bundled_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    data = TextClassificationData(["short one", "a much longer text " * 40], [1, 0], ["a", "b"])
    examples = tokenize_classification(tokenizer, data, max_length=16)
    assert [e["labels"] for e in examples] == [1, 0]
    assert len(examples[1]["input_ids"]) == 16
    assert examples[0]["input_ids"] == tokenizer("short one")["input_ids"]
    batch = pad_collate(examples, pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [len(examples[0]["input_ids"]), 16]


# --------------------------------------------------------------------------- model loading
def tiny_bert_folder(tmp_path, num_labels: int | None):
    """A random-weight BERT folder, with a classification head of ``num_labels`` or none."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=30522,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    if num_labels is None:
        model = BertModel(config)
    else:
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(folder)
    return folder


def test_load_adds_a_named_head_to_a_bare_encoder(tmp_path):
    folder = tiny_bert_folder(tmp_path, num_labels=None)
    model, tokenizer = load_sequence_classifier(folder, ["x", "y", "z"])
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "x", 1: "y", 2: "z"}
    logits = model(**tokenizer(["hello"], return_tensors="pt")).logits
    assert logits.shape == (1, 3) and logits.dtype == torch.float32


def test_existing_head_must_hold_the_labels(tmp_path):
    folder = tiny_bert_folder(tmp_path, num_labels=2)
    model, _ = load_sequence_classifier(folder, ["x", "y"])
    assert model.config.num_labels == 2
    with pytest.raises(
        DataError, match=r"the data has 3 labels but the classifier .* has 2 outputs"
    ):
        load_sequence_classifier(folder, ["x", "y", "z"])


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="it does not exist"):
        load_sequence_classifier(tmp_path / "nope", ["a", "b"])
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_sequence_classifier(tmp_path, ["a", "b"])
    write(tmp_path / "config.json", "{}")
    with pytest.raises(ModelLoadError, match="is not a transformers model folder"):
        load_sequence_classifier(tmp_path, ["a", "b"])
