"""``torchdora finetune --compare lora,dora [--seeds 0,1,2]``: a study in one command.

Every method runs at every seed with the same data, split and budget, each in a fresh process
(so peak memory is its own) into ``DIR/<method>`` (one seed) or ``DIR/<method>/seed<k>``; then
the task's metrics are tabulated (:mod:`torchdora.recipes.study`) and written with every run's
metrics to ``DIR/compare.json``. A SIGINT or SIGTERM goes to the running run once: it
checkpoints and stops, and the hint names the flags that finish it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchdora.recipes.run_folder import CHECKPOINT_DIR, RUN_ENTRIES, check_run_folder
from torchdora.recipes.settings import FinetuneConfig
from torchdora.recipes.study import format_summary, summarize
from torchdora.recipes.tasks import get_task

#: Set in the environment of a run of a comparison, whose parent reports an interrupt.
COMPARE_RUN = "TORCHDORA_COMPARE_RUN"
COMPARE_FILE = "compare.json"


@dataclass(frozen=True)
class PlannedRun:
    method: str
    seed: int
    folder: Path
    settings: dict[str, Any]  # what the run's --config file holds


def parse_list(flag: str, text: str, what: str, example: str) -> list[str]:
    """The comma-separated values of ``flag`` (each a ``what``): at least one, none twice."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{flag} needs at least one {what}, e.g. {flag} {example}")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ValueError(f"{flag} lists {', '.join(repeated)} more than once")
    return items


def parse_methods(text: str) -> list[str]:
    """``--compare lora,dora`` as method names (checked with the other settings)."""
    return parse_list("--compare", text, "method", "lora,dora")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as integers."""
    items = parse_list("--seeds", text, "seed", "0,1,2")
    try:
        seeds = [int(item) for item in items]
    except ValueError:
        raise ValueError(f"--seeds must be integers separated by commas, got {text!r}") from None
    if len(set(seeds)) < len(seeds):  # "1" and "01"
        raise ValueError(f"--seeds lists a seed more than once: {text!r}")
    return seeds


def plan_runs(
    values: dict[str, Any], methods: list[str] | None, seeds: list[int] | None
) -> tuple[Path, list[PlannedRun]]:
    """The comparison's folder and runs, seed by seed (so an early stop leaves whole pairs),
    every setting and folder checked before the first run. ``methods`` ``None``: the method of
    ``values``; ``seeds`` ``None``: its seed."""
    if values.get("resume") is not None:
        raise ValueError("--compare and --seeds start their runs afresh: resume a run on its own")
    if seeds is not None and "seed" in values:
        raise ValueError("--seed and --seeds both given: pick one (--seeds runs each of its seeds)")
    methods = methods or [FinetuneConfig.from_dict(values).method]
    output, overwrite = values.get("output"), bool(values.get("overwrite"))
    root = Path(output or tempfile.mkdtemp(prefix="torchdora-compare-"))
    runs = []
    for seed in seeds or [None]:
        for method in methods:
            folder = (
                root / method if seeds is None or len(seeds) == 1 else root / method / f"seed{seed}"
            )
            settings = {**values, "method": method, "output": str(folder)}
            if seed is not None:
                settings["seed"] = seed
            config = FinetuneConfig.from_dict(settings)  # fails fast on bad settings
            runs.append(PlannedRun(method, config.seed, folder, settings))
    for run in runs:  # before the first run: not half-way through the comparison
        if run.folder.parent != root and _holds_a_run(run.folder.parent):
            raise ValueError(
                f"{run.folder.parent} holds a single-seed run; the runs of --seeds go into "
                f"{run.folder.parent}/seed<k>: move it away or choose another --output"
            )
        check_run_folder(run.folder, resume=False, overwrite=overwrite)
    if (root / COMPARE_FILE).exists():
        if not overwrite:
            raise ValueError(
                f"{root / COMPARE_FILE} holds an earlier comparison: pass --overwrite to start "
                "afresh (or choose another --output)"
            )
        (root / COMPARE_FILE).unlink()
    return root, runs


def _holds_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_ENTRIES)


def run_comparison(
    values: dict[str, Any], methods: list[str] | None, seeds: list[int] | None
) -> int:
    """Run the comparison of ``methods`` at ``seeds`` (see :func:`plan_runs`) with the other
    settings of ``values``, print its table and write ``compare.json``; returns the exit
    status (``128 + signal`` when a run was stopped by one)."""
    task = get_task(FinetuneConfig.from_dict(values).task)
    root, runs = plan_runs(values, methods, seeds)
    results = {}
    with tempfile.TemporaryDirectory(prefix="torchdora-compare-") as settings:
        for index, run in enumerate(runs):
            config_path = Path(settings) / f"{index}.json"
            config_path.write_text(json.dumps(run.settings))
            seed = f", seed {run.seed}" if seeds is not None else ""
            print(f"== {run.method}{seed} ==", flush=True)
            cmd = [sys.executable, "-m", "torchdora", "finetune", "--config", str(config_path)]
            returncode = _run_child(cmd)
            if returncode - 128 in (signal.SIGINT, signal.SIGTERM):
                hint = _interrupted(returncode - 128, run, seeds is not None, methods is not None)
                print(f"torchdora finetune: {hint}", file=sys.stderr)
                return returncode
            if returncode != 0:
                raise RuntimeError(f"the {run.method} run{seed} failed (see its output above)")
            results[run.method, run.seed] = json.loads((run.folder / "metrics.json").read_text())
    names = list(dict.fromkeys(run.method for run in runs))
    seed_values = list(dict.fromkeys(run.seed for run in runs))
    summary = summarize(task.metrics, names, seed_values, results)
    for line in format_summary(task.metrics, names, seed_values, summary):
        print(line)
    report = {
        "task": task.name,
        "methods": names,
        "seeds": seed_values,
        "metrics": [vars(metric) for metric in task.metrics],
        "runs": [
            {
                "method": run.method,
                "seed": run.seed,
                "folder": str(run.folder),
                "metrics": results[run.method, run.seed],
            }
            for run in runs
        ],
        **summary,
    }
    (root / COMPARE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"runs in {root}; table and per-run metrics in {root / COMPARE_FILE}")
    return 0


def _run_child(cmd: list[str]) -> int:
    """Run one run of the comparison and return its exit status. It runs in a session of its
    own, so Ctrl-C reaches this process alone, which passes a SIGINT or SIGTERM on to it once:
    the run checkpoints and stops as a plain run does, and leaves the report to this one."""
    child = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, COMPARE_RUN: "1"})

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupted(signum: int, run: PlannedRun, seeded: bool, compared: bool) -> str:
    """What to do after a signal stopped ``run`` of the comparison."""
    flags = [flag for flag, given in (("--compare", compared), ("--seeds", seeded)) if given]
    again = "rerun the same command with --overwrite to start the comparison again"
    if (run.folder / CHECKPOINT_DIR).is_dir():
        checkpoint = run.folder / CHECKPOINT_DIR
        seed = f" --seed {run.seed}" if seeded else ""
        again = (
            f"its checkpoint is in {checkpoint}: to finish that run, rerun with --method "
            f"{run.method}{seed} --output {run.folder} --resume {checkpoint} in place of "
            f"{', '.join(flags)} and --output, or {again}"
        )
    name = signal.Signals(signum).name
    seed = f" (seed {run.seed})" if seeded else ""
    return f"interrupted by {name} during the {run.method} run{seed} of {flags[0]}; {again}"
