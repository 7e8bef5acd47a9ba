"""From run directories to plots: what ``torchdora analyze RUN_DIR…`` does."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from torchdora.analysis.figure2 import relations, select_checkpoints, select_module_type
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
RELATIONS_FILE = "figure2.json"


def analyze_runs(
    run_dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    module_type: str | None = None,
    checkpoints: int | None = None,
) -> list[Path]:
    """Plot the runs in ``run_dirs`` into ``out_dir``; returns the files written.

    Reads each run's ``decomposition.jsonl`` and ``metrics.jsonl`` (either may be missing; see
    :mod:`torchdora.analysis.records` for both formats) and writes ``decomposition.png``
    (:func:`plot_decomposition`: one panel per method, runs with the same method, e.g. seeds,
    pooled), ``figure2.json`` (:func:`~torchdora.analysis.figure2.relations` of those points,
    per method) and ``loss.png`` (:func:`plot_loss_curves`: training and eval loss of every
    run, labelled by the run directory's name). A record without a ``method`` takes the run
    directory's name.

    The DoRA paper's figure 2 (see :mod:`torchdora.analysis.figure2`) is ``module_type=
    "query", checkpoints=4``: only the layers of that module type, at that many checkpoints of
    each run (the last and evenly spread earlier ones); ``None``: every layer, every step.
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
    records, curves, steps = [], {}, {}
    for run, label in zip(runs, labels, strict=True):
        decomposition, metrics = run / DECOMPOSITION_FILE, run / METRICS_FILE
        if not decomposition.is_file() and not metrics.is_file():
            warnings.warn(
                f"{run} has neither {DECOMPOSITION_FILE} nor {METRICS_FILE}", stacklevel=2
            )
        if decomposition.is_file():
            run_records = read_decomposition(decomposition)
            if module_type is not None:
                run_records = select_module_type(run_records, module_type, str(run))
            if checkpoints is not None:
                run_records = select_checkpoints(run_records, checkpoints)
            steps[label] = [r["step"] for r in run_records if r["step"] != 0]
            records += [{"method": label} | r for r in run_records]
        if metrics.is_file():
            curves[label] = read_loss_curves(metrics)
    written = []
    if records:
        written.append(plot_decomposition(records, Path(out_dir) / DECOMPOSITION_PLOT))
        summary = {"module_type": module_type, "checkpoints": checkpoints, "steps": steps}
        summary["methods"] = relations(records)
        written.append(Path(out_dir) / RELATIONS_FILE)
        written[-1].write_text(json.dumps(summary, indent=2) + "\n")
    if any(curves.values()):
        written.append(plot_loss_curves(curves, Path(out_dir) / LOSS_PLOT))
    if not written:
        raise ValueError(
            f"nothing to plot: no run directory holds records in {DECOMPOSITION_FILE} or loss "
            f"values in {METRICS_FILE} ({', '.join(map(str, runs))})"
        )
    return written
