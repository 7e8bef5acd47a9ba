"""From run directories to plots: what ``torchdora analyze RUN_DIR…`` does."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from torchdora.analysis.plots import plot_decomposition, plot_loss_curves
from torchdora.analysis.records import (
    DECOMPOSITION_FILE,
    METRICS_FILE,
    read_decomposition,
    read_loss_curves,
)
from torchdora.io.files import not_a_folder

DECOMPOSITION_PLOT = "decomposition.png"
LOSS_PLOT = "loss.png"


def analyze_runs(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Plot the runs in ``run_dirs`` into ``out_dir``; returns the PNGs written.

    Reads each run's ``decomposition.jsonl`` and ``metrics.jsonl`` (either may be missing; see
    :mod:`torchdora.analysis.records` for both formats) and writes ``decomposition.png``
    (:func:`plot_decomposition`: one panel per method, runs with the same method, e.g. seeds,
    pooled) and ``loss.png`` (:func:`plot_loss_curves`: training and eval loss of every run,
    labelled by the run directory's name). A record without a ``method`` takes the run
    directory's name.
    """
    runs = [Path(run_dir) for run_dir in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    for run in runs:
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {str(run)!r} {not_a_folder(run)}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FileExistsError(f"output folder {str(out_dir)!r} {not_a_folder(out_dir)}")
    names = [run.name for run in runs]
    labels = names if len(set(names)) == len(names) else [str(run) for run in runs]
    records, curves = [], {}
    for run, label in zip(runs, labels, strict=True):
        decomposition, metrics = run / DECOMPOSITION_FILE, run / METRICS_FILE
        if not decomposition.is_file() and not metrics.is_file():
            warnings.warn(
                f"{run} has neither {DECOMPOSITION_FILE} nor {METRICS_FILE}", stacklevel=2
            )
        if decomposition.is_file():
            records += [{"method": label} | r for r in read_decomposition(decomposition)]
        if metrics.is_file():
            curves[label] = read_loss_curves(metrics)
    written = []
    if records:
        written.append(plot_decomposition(records, Path(out_dir) / DECOMPOSITION_PLOT))
    if any(curves.values()):
        written.append(plot_loss_curves(curves, Path(out_dir) / LOSS_PLOT))
    if not written:
        raise ValueError(
            f"nothing to plot: no run directory holds records in {DECOMPOSITION_FILE} or loss "
            f"values in {METRICS_FILE} ({', '.join(map(str, runs))})"
        )
    return written
