"""Reporting a run: a tqdm bar on a terminal, one plain line per log step otherwise, and
optionally every record as a line of JSON in a metrics file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

PROGRESS_MODES = ("auto", "bar", "log", "none")


def format_record(record: dict[str, Any]) -> str:
    """``step 10/100 | loss 0.6931 | lr 1.00e-03 | …``: a record as one short line."""
    parts = []
    for key, value in record.items():
        if key == "total_steps":
            continue
        if key == "step" and "total_steps" in record:
            value = f"{value}/{record['total_steps']}"
        elif isinstance(value, float):
            value = f"{value:.2e}" if key == "lr" else f"{value:.4g}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)


class ProgressReporter:
    """Shows training progress and writes metrics.

    Args:
        total_steps: optimizer steps of the whole run.
        initial_step: steps already done (a resumed run).
        mode: ``"bar"`` (tqdm), ``"log"`` (a line per record), ``"none"``, or ``"auto"``:
            a bar when ``stream`` is a terminal and tqdm is installed, else lines.
        stream: where the bar and lines go (standard error by default).
        metrics_file: if given, every record is appended to it as a JSON line.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        mode: str = "auto",
        stream: TextIO | None = None,
        metrics_file: str | Path | None = None,
    ) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {mode!r}")
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.bar = None
        if mode in ("auto", "bar"):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if mode == "bar":
                    raise
            else:
                if mode == "bar" or self.stream.isatty():
                    self.bar = tqdm(
                        total=total_steps, initial=initial_step, file=self.stream, unit="step"
                    )
        self.print_lines = self.bar is None and mode != "none"
        self.metrics = None
        if metrics_file is not None:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(metrics_file, "a", encoding="utf-8")  # noqa: SIM115

    def update(self, steps: int = 1) -> None:
        """Advance the bar by ``steps`` optimizer steps."""
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict[str, Any]) -> None:
        """Show a record (bar postfix, or a line) and write it to the metrics file."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        record = {"step": record["step"], "total_steps": self.total_steps, **record}
        if self.bar is not None:
            if any(key.startswith("eval_") for key in record):
                self.bar.write(format_record(record), file=self.stream)
            else:
                shown = ("loss", "lr", "tokens_per_s")
                self.bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})
        elif self.print_lines:
            print(format_record(record), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
