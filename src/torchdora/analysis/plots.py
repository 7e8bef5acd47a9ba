"""PNG plots of the analysis: ΔM against ΔD per method (the DoRA paper's figure 2), and loss
curves of several runs. Needs matplotlib (``pip install 'torchdora[analysis]'``); figures are
drawn off screen, without pyplot, so no display or global backend is involved."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torchdora.analysis.records import decomposition_points, pearson

LINESTYLES = ("-", "--", ":", "-.")


def plot_decomposition(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    panel_size: tuple[float, float] = (4.0, 3.5),
    dpi: int = 100,
) -> Path:
    """ΔD (x) against ΔM (y): one panel per method, one point per layer and checkpoint, one
    colour per checkpoint step (the same step has the same colour in every panel), and each
    method's Pearson correlation in its panel's title.

    Args:
        records: checkpoint records (:func:`~torchdora.analysis.decomposition_record`), each
            with a ``method``; step 0 is left out (every change is 0 there).
        path: the PNG to write.
        panel_size: inches per panel; the image is ``len(methods) × panel_size`` inches.
        dpi: pixels per inch.
    """
    points = decomposition_points(records)
    if not points:
        raise ValueError("no decomposition records to plot")
    steps = sorted({step for method_points in points.values() for step, _, _ in method_points})
    figure = _figure(panel_size[0] * len(points), panel_size[1], dpi)
    colormap = _matplotlib().colormaps["viridis"]
    colours = {step: colormap(i / max(len(steps) - 1, 1)) for i, step in enumerate(steps)}
    axes = figure.subplots(1, len(points), squeeze=False)[0]
    for ax, (method, method_points) in zip(axes, points.items(), strict=True):
        for step in steps:
            at_step = [(d, m) for s, d, m in method_points if s == step]
            if at_step:
                d, m = zip(*at_step, strict=True)
                ax.scatter(d, m, s=16, color=colours[step], label=f"step {step}")
        r = pearson([p[1] for p in method_points], [p[2] for p in method_points])
        shown = "n/a" if math.isnan(r) else f"{r:+.2f}"
        ax.set_title(f"{method}   r = {shown}  ({len(method_points)} points)")
        ax.set_xlabel("ΔD (direction change)")
        ax.set_ylabel("ΔM (magnitude change)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
    if steps:
        axes[-1].legend(title="checkpoint", fontsize="small", ncols=math.ceil(len(steps) / 12))
    return _save(figure, path)


def plot_loss_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    path: str | os.PathLike,
    *,
    size: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Loss against step for several runs: one colour per run, one line style per metric.

    Args:
        curves: ``{run label: {metric: [(step, value), ...]}}``, e.g. from
            :func:`~torchdora.analysis.read_loss_curves`.
        path: the PNG to write.
        size: the image's size in inches.
        dpi: pixels per inch.
    """
    if not any(run_curves for run_curves in curves.values()):
        raise ValueError("no loss curves to plot")
    figure = _figure(*size, dpi)
    ax = figure.subplots()
    styles: dict[str, str] = {}
    for i, (run, run_curves) in enumerate(curves.items()):
        for metric, curve in run_curves.items():
            style = styles.setdefault(metric, LINESTYLES[len(styles) % len(LINESTYLES)])
            steps, values = zip(*curve, strict=True)
            marker = "o" if metric.startswith("eval") else None
            ax.plot(
                steps,
                values,
                linestyle=style,
                marker=marker,
                markersize=3,
                color=f"C{i % 10}",
                label=f"{run}: {metric}",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


def _matplotlib():
    try:
        import matplotlib
        import matplotlib.figure
    except ImportError:
        raise ImportError(
            "torchdora's plots need matplotlib: pip install 'torchdora[analysis]'"
        ) from None
    return matplotlib


def _figure(width: float, height: float, dpi: int):
    return _matplotlib().figure.Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=figure.dpi)
    return path
