"""The files a run directory holds for analysis, and reading them back.

``decomposition.jsonl`` (:data:`DECOMPOSITION_FILE`): one JSON object per line, one line per
checkpoint, as :func:`decomposition_record` makes them::

    {"step": 200, "method": "DoRA",
     "layers": {"encoder.layer.0.attention.self.query": {"delta_m": 0.0123, "delta_d": 4.5e-05},
                ...}}

``metrics.jsonl`` (:data:`METRICS_FILE`): the training loop's log, one JSON object per line
with an integer ``"step"`` and any numbers, e.g. ``{"step": 10, "loss": 0.69, "lr": 1e-3}`` and
``{"step": 50, "eval_loss": 0.52, "eval_accuracy": 0.81}``.

The readers are tolerant, so a run killed mid-write or resumed still reads: blank lines are
skipped; lines that are not JSON objects, or records without a usable step or value, are
skipped with a warning; when a step appears more than once (a resumed run logs the steps after
its checkpoint again) the last record wins.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torchdora.analysis.change import LayerChange

DECOMPOSITION_FILE = "decomposition.jsonl"
METRICS_FILE = "metrics.jsonl"

#: The metrics that :func:`read_loss_curves` reads by default.
LOSS_KEYS = ("loss", "eval_loss")


def decomposition_record(
    step: int, method: str, changes: Mapping[str, LayerChange]
) -> dict[str, Any]:
    """One checkpoint's line of ``decomposition.jsonl`` (see the module docstring)."""
    return {
        "step": int(step),
        "method": method,
        "layers": {
            name: {"delta_m": change.delta_m, "delta_d": change.delta_d}
            for name, change in changes.items()
        },
    }


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` to ``path`` as one line of JSON (the folder is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line; other lines are skipped with a warning."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                warnings.warn(f"{path}:{number}: not a JSON object, skipped", stacklevel=2)
    return records


def read_decomposition(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The checkpoint records of a ``decomposition.jsonl``, one per step, sorted by step.

    A record needs an integer ``step`` and a ``layers`` object of finite ``delta_m`` and
    ``delta_d``; ``method`` may be absent (the caller names it).
    """
    by_step: dict[int, dict[str, Any]] = {}
    for record in read_jsonl(path):
        if _step(record) is None or not _valid_layers(record.get("layers")):
            warnings.warn(f"{path}: skipped a malformed record {_excerpt(record)}", stacklevel=2)
            continue
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def read_loss_curves(
    path: str | os.PathLike, keys: Iterable[str] = LOSS_KEYS
) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step, for each of ``keys`` that the metrics
    file has. Records lacking a key, or whose value is not a finite number, are left out of
    that key's curve."""
    curves: dict[str, dict[int, float]] = {key: {} for key in keys}
    for record in read_jsonl(path):
        step = _step(record)
        if step is None:
            warnings.warn(
                f"{path}: skipped a record without a step {_excerpt(record)}", stacklevel=2
            )
            continue
        for key, curve in curves.items():
            if _finite(record.get(key)):
                curve[step] = float(record[key])
    return {key: sorted(curve.items()) for key, curve in curves.items() if curve}


def decomposition_points(
    records: Iterable[Mapping[str, Any]],
) -> dict[str, list[tuple[int, float, float]]]:
    """``{method: [(step, ΔD, ΔM), ...]}``: one point per layer and checkpoint, methods in the
    order they first appear. Step 0 is left out: every change is 0 there by construction."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for record in records:
        method_points = points.setdefault(record["method"], [])
        if record["step"] == 0:
            continue
        for change in record["layers"].values():
            method_points.append((record["step"], change["delta_d"], change["delta_m"]))
    return points


def pearson(x: Iterable[float], y: Iterable[float]) -> float:
    """Pearson's correlation coefficient; NaN if it is undefined (< 2 points, or no spread)."""
    try:
        return statistics.correlation(list(x), list(y))
    except statistics.StatisticsError:
        return math.nan


def method_correlations(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """``{method: Pearson r between ΔD and ΔM}`` over all its layers and checkpoints after 0.

    The DoRA paper (figure 2) finds LoRA's positive and full fine-tuning's and DoRA's negative.
    """
    return {
        method: pearson([p[1] for p in points], [p[2] for p in points])
        for method, points in decomposition_points(records).items()
    }


def _step(record: Mapping[str, Any]) -> int | None:
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _valid_layers(layers: Any) -> bool:
    return isinstance(layers, dict) and all(
        isinstance(change, dict)
        and _finite(change.get("delta_m"))
        and _finite(change.get("delta_d"))
        for change in layers.values()
    )


def _excerpt(record: Mapping[str, Any]) -> str:
    text = json.dumps(record)
    return text if len(text) <= 80 else text[:77] + "..."
