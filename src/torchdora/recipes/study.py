"""The numbers of a comparison: per method the mean ± std over seeds of each metric its task
declares, and the paired differences to the first method (same seed, same data, same budget).

Pure functions over the runs' ``metrics.json`` contents; :mod:`torchdora.recipes.compare`
runs the study and prints :func:`format_summary`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from torchdora.recipes.tasks import Metric

#: Shown for every task beside its own metrics (means over the seeds, never compared).
RUN_COLUMNS = (
    Metric("trainable_parameters", "trainable", None),
    Metric("time_per_step_s", "s/step", None),
    Metric("peak_rss_mb", "peak MB", None),
)
_FORMATS = {"trainable_parameters": ",.0f", "time_per_step_s": ".3f", "peak_rss_mb": ".0f"}

Runs = Mapping[tuple[str, int], Mapping[str, Any]]  # (method, seed) -> metrics.json


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``; ``std`` is the sample standard deviation (n − 1), ``None``
    for a single value."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def summarize(
    metrics: Sequence[Metric], methods: Sequence[str], seeds: Sequence[int], runs: Runs
) -> dict[str, Any]:
    """The study's summary (what ``compare.json`` holds beside the runs).

    ``per_method[method][key]`` is :func:`mean_std` of ``key`` over ``seeds``, for each of
    ``metrics`` and :data:`RUN_COLUMNS`. ``paired[method][key]``, for every method after the
    first and every metric with a direction, holds the per-seed differences ``method − first``
    (``differences``, in the order of ``seeds``), their :func:`mean_std`, and how many seeds
    favour each side (``favour``: ``{method: n, first: n, "tie": n}``).
    """
    columns = [*metrics, *RUN_COLUMNS]
    per_method = {
        method: {m.key: mean_std([runs[method, s][m.key] for s in seeds]) for m in columns}
        for method in methods
    }
    first, paired = methods[0], {}
    for method in methods[1:]:
        paired[method] = {}
        for metric in metrics:
            if metric.higher_is_better is None:
                continue
            differences = [runs[method, s][metric.key] - runs[first, s][metric.key] for s in seeds]
            sign = 1 if metric.higher_is_better else -1
            favour = {
                method: sum(sign * d > 0 for d in differences),
                first: sum(sign * d < 0 for d in differences),
                "tie": sum(d == 0 for d in differences),
            }
            spread = mean_std(differences)
            paired[method][metric.key] = {
                "against": first,
                "differences": spread.pop("values"),
                **spread,
                "favour": favour,
            }
    return {"per_method": per_method, "paired": paired}


def format_summary(
    metrics: Sequence[Metric], methods: Sequence[str], seeds: Sequence[int], summary: dict
) -> list[str]:
    """The table of :func:`summarize` (one row per method; ``mean ± std`` over several seeds)
    and, for two methods or more, the paired differences to the first method."""
    several = len(seeds) > 1
    columns = [*metrics, *RUN_COLUMNS]

    def cell(metric: Metric, stats: dict[str, Any]) -> str:
        spec = _FORMATS.get(metric.key, ".4f")
        text = format(stats["mean"], spec)
        if several and metric.key not in _FORMATS:
            text += f" ± {stats['std']:{spec}}"
        return text

    rows = [
        [method, *(cell(m, summary["per_method"][method][m.key]) for m in columns)]
        for method in methods
    ]
    header = ["method", *(m.label for m in columns)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [""]
    if several:
        lines.append(f"mean ± std over seeds {_seed_list(seeds)}")
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w + 2) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("".join(cells).rstrip())
    if len(methods) < 2:
        return lines
    first = methods[0]
    lines += [
        "",
        f"paired differences (per seed: method − {first}), mean ± std over "
        f"{len(seeds)} seed{'s' * several}",
    ]
    for method, by_metric in summary["paired"].items():
        for metric in metrics:
            if metric.key not in by_metric:
                continue
            pair = by_metric[metric.key]
            spread = f"{pair['mean']:+.4f}" + (f" ± {pair['std']:.4f}" if several else "")
            favour = pair["favour"]
            lines.append(
                f"  {method} − {first}  {metric.label}: {spread}  "
                f"({method} better in {favour[method]}, {first} in {favour[first]}, "
                f"tied in {favour['tie']} of {len(seeds)})"
            )
    return lines


def _seed_list(seeds: Sequence[int]) -> str:
    return ",".join(str(s) for s in seeds)
