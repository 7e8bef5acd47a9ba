"""The DoRA paper's figure-2 protocol (Liu et al. 2024, §2.2) on recorded ΔM/ΔD.

The paper takes one module type (the query projections), each layer's ΔM and ΔD at three
intermediate checkpoints and the final one, plots ΔM against ΔD per method, and reads the sign
of the trend: negative for full fine-tuning and DoRA, positive for LoRA. ``torchdora analyze
--module-type query --checkpoints 4`` selects those points; without the options every analysed
layer at every recorded step counts.

The sign is read as the least-squares slope of ΔM on ΔD, beside Pearson's r, twice: over all
the points (what the eye reads off the figure), and per checkpoint across the layers. Pooled
checkpoints trend upwards by construction, since every layer's ΔM and ΔD grow with the steps;
a single checkpoint's slope does not see that.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torchdora.analysis.records import pearson

#: What the paper plots: three intermediate checkpoints and the final one.
PAPER_CHECKPOINTS = 4

Record = Mapping[str, Any]  # a line of decomposition.jsonl (see torchdora.analysis.records)


def module_type(layer: str) -> str:
    """``"query"`` for ``"encoder.layer.3.attention.self.query"``: the last part of the name."""
    return layer.rsplit(".", 1)[-1]


def select_module_type(records: Iterable[Record], name: str, source: str) -> list[dict[str, Any]]:
    """``records`` with only the layers whose :func:`module_type` is ``name``; ``source`` (the
    run) names the records in the error raised when none is."""
    records = list(records)
    kept = [
        {**record, "layers": {k: v for k, v in record["layers"].items() if module_type(k) == name}}
        for record in records
    ]
    if not any(record["layers"] for record in kept):
        found = sorted({module_type(layer) for record in records for layer in record["layers"]})
        raise ValueError(
            f"{source} has no layers of module type {name!r}; its types are "
            f"{', '.join(found) or 'none'}: pick one of them for --module-type"
        )
    return kept


def select_checkpoints(records: Sequence[Record], count: int) -> list[Record]:
    """The last of ``records`` (sorted by step, step 0 left out) and ``count - 1`` earlier ones
    spread evenly: the ``⌈j·n/count⌉``-th of the ``n`` recorded steps for ``j = 1 … count``
    (steps 10…40 and ``count = 4``: all four; 10…100: 30, 50, 80, 100). Fewer than ``count``
    recorded: all of them."""
    if count < 1:
        raise ValueError(f"--checkpoints must be a positive integer, got {count}")
    trained = sorted((r for r in records if r["step"] != 0), key=lambda r: r["step"])
    if len(trained) <= count:
        return trained
    return [trained[math.ceil(j * len(trained) / count) - 1] for j in range(1, count + 1)]


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """The least-squares slope of ``y`` on ``x``; NaN where it is undefined (< 2 points, or
    no spread in ``x``)."""
    try:
        return statistics.linear_regression(x, y).slope
    except statistics.StatisticsError:
        return math.nan


def relation(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """``{"points", "slope", "pearson"}`` of ``(ΔD, ΔM)`` points: ΔM's slope on ΔD."""
    x, y = [p[0] for p in points], [p[1] for p in points]
    return {"points": len(points), "slope": slope(x, y), "pearson": pearson(x, y)}


def relations(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Per method (in the order they appear): :func:`relation` over all its points (step 0
    left out), with ``"steps"`` and ``"per_checkpoint"`` (one :func:`relation` per step,
    across layers; records of several runs of a method at one step are pooled)."""
    by_method: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for record in records:
        at_step = by_method.setdefault(record["method"], {})
        if record["step"] == 0:
            continue
        points = at_step.setdefault(record["step"], [])
        points += [(c["delta_d"], c["delta_m"]) for c in record["layers"].values()]
    summary = {}
    for method, at_step in by_method.items():
        steps = sorted(at_step)
        summary[method] = {
            **relation([p for step in steps for p in at_step[step]]),
            "steps": steps,
            "per_checkpoint": [{"step": s, **relation(at_step[s])} for s in steps],
        }
    return summary


def format_relations(summary: Mapping[str, Mapping[str, Any]], layers: str) -> list[str]:
    """One line per method of :func:`relations`: r, slope, the points, the per-checkpoint
    slopes' signs. ``layers`` says which layers the points are (``"query layers"``)."""
    lines = []
    for method, found in summary.items():
        signs = " ".join(_sign(c["slope"]) for c in found["per_checkpoint"])
        steps = ", ".join(map(str, found["steps"]))
        lines.append(
            f"{method}: corr(ΔD, ΔM) = {found['pearson']:+.3f}, slope ΔM/ΔD = "
            f"{found['slope']:+.3g} over {found['points']} points ({layers} at steps {steps}); "
            f"per checkpoint slope {signs or 'n/a'}"
        )
    return lines


def _sign(value: float) -> str:
    return "n/a" if math.isnan(value) else "+" if value > 0 else "−" if value < 0 else "0"
