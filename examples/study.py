"""The quality study of ``docs/RESULTS.md`` in one script: where does DoRA beat LoRA, by how much,
beyond the seed-to-seed spread?

Every comparison is one ``torchdora finetune --compare METHODS --seeds SEEDS`` command (each
method at each seed in a fresh process, the same data, split and budget), and figure 2 is
``torchdora analyze --module-type query --checkpoints 4``; this script runs them, prints each
command before it runs, and then prints the tables as Markdown:

* ``ablation``: the seed guide's two ablation tables on BBC News (MiniLM): DoRA, DoRA with a
  frozen magnitude, DoRA without normalisation and LoRA at ranks 2 and 8, and a full fine-tune;
* ``low-data``: the same methods where the task is not saturated: 16 training articles per
  topic, ranks 1 and 2, five seeds;
* ``magnitude-lr``: a control of the low-data part at rank 1: DoRA with its magnitude at the
  learning rate of everything else (by default it is 3x), against LoRA;
* ``causal``: SmolLM2-135M-Instruct on the ChatterBot corpus (held-out loss) at ranks 2 and 8,
  in a short budget (20 steps of 8 conversations of at most 64 tokens);
* ``figure2``: the DoRA paper's figure 2 protocol on the rank-8 ablation runs of every seed.

Each part writes under ``--output`` (run folders, several GB with the causal-LM models) and
copies the small files a reader needs to check the tables to ``--keep`` (``compare.json`` and
each run's ``metrics.json``/``config.json``, the figure-2 runs' ``decomposition.jsonl`` and
``figure2.json``, ``study.json`` with the commands and their wall times). A part whose
``compare.json`` exists is read back, not run again. What ``docs/RESULTS.md`` reports::

    .venv/bin/python examples/study.py --output runs/study --keep docs/study
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ABLATION = ("dora", "dora-frozen-magnitude", "dora-no-norm", "lora")
FIGURE2 = ("full", "lora", "dora", "dora-no-norm")  # the paper's panels and our no-norm
PARTS = ("ablation", "low-data", "magnitude-lr", "causal", "figure2")
KEPT_FILES = ("metrics.json", "config.json")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="the run folders go here")
    p.add_argument("--keep", required=True, help="the small files to commit go here")
    p.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    p.add_argument("--methods", default=",".join(ABLATION), help="first: the paired reference")
    p.add_argument("--seeds", default="0,1,2", help="of the ablation and causal parts")
    p.add_argument("--ranks", default="2,8", help="of the ablation; figure 2 uses the last")
    p.add_argument("--max-steps", type=int, default=40, help="of every classification run")
    p.add_argument(
        "--control-magnitude-lr",
        type=float,
        default=3e-3,
        help="DoRA's magnitude lr in the magnitude-lr part: the classification lr, not 3x it",
    )
    p.add_argument("--full-lr", type=float, default=1e-3, help="the full fine-tune's lr")
    p.add_argument("--low-data-seeds", default="0,1,2,3,4")
    p.add_argument("--low-data-ranks", default="1,2")
    p.add_argument("--train-per-class", type=int, default=16)
    p.add_argument("--lm-ranks", default="2,8")
    p.add_argument("--lm-max-steps", type=int, default=20)
    p.add_argument("--lm-max-length", type=int, default=64)
    p.add_argument("--model", help="classifier model folder (default: the bundled MiniLM)")
    p.add_argument("--data", help="classification data (default: BBC News)")
    p.add_argument("--label-column", help="of --data")
    p.add_argument("--lm-model", help="causal LM folder (default: SmolLM2, exported once)")
    p.add_argument("--lm-data", help="conversations (default: the ChatterBot corpus)")
    return p.parse_args()


def ranks(text: str) -> list[int]:
    return [int(r) for r in text.split(",")]


class Commands:
    """``study.json``: every command that ran, by the folder it wrote, with its wall time;
    kept up to date as the study goes, so an interrupted study's times stay."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ran = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, args: list[str]) -> None:
        """Run ``torchdora ARGS`` with this Python, after printing it."""
        command = "torchdora " + shlex.join(args)
        print(f"\n$ {command}", flush=True)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "torchdora", *args], check=True)
        self.ran[name] = {"command": command, "wall_s": time.monotonic() - start}
        self.path.write_text(json.dumps(self.ran, indent=2) + "\n")


def compare(
    args: argparse.Namespace,
    name: str,
    flags: list[str],
    commands: Commands,
    *,
    figure2: bool = False,
) -> dict:
    """``compare.json`` of ``torchdora finetune FLAGS --output OUTPUT/NAME`` (run unless it
    is there), with its small files copied to ``KEEP/NAME`` (with ``figure2``, the runs'
    ``decomposition.jsonl`` too)."""
    out = Path(args.output) / name
    if not (out / "compare.json").is_file():
        finetune = ["finetune", *flags, "--progress", "none", "--output", str(out)]
        commands.run(name, [*finetune, "--overwrite"])
    keep = Path(args.keep) / name
    report = json.loads((out / "compare.json").read_text())
    for run in report["runs"]:
        folder = Path(run["folder"])
        kept = keep / folder.relative_to(out)
        kept.mkdir(parents=True, exist_ok=True)
        for file in [*KEPT_FILES, *(["decomposition.jsonl"] if figure2 else [])]:
            if (folder / file).is_file():
                shutil.copy2(folder / file, kept / file)
    shutil.copy2(out / "compare.json", keep / "compare.json")
    return report


def classification_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--max-steps", str(args.max_steps)]
    for flag, value in (
        ("--model", args.model),
        ("--data", args.data),
        ("--label-column", args.label_column),
    ):
        flags += [flag, value] if value else []
    return flags


def adapter_flags(methods: str, rank: int, seeds: str) -> list[str]:
    return ["--compare", methods, "--rank", str(rank), "--alpha", str(2 * rank), "--seeds", seeds]


def ablation(args: argparse.Namespace, commands: Commands) -> dict:
    reports = {
        f"r={r}": compare(
            args,
            f"ablation-r{r}",
            [*classification_flags(args), *adapter_flags(args.methods, r, args.seeds)],
            commands,
            figure2=True,
        )
        for r in ranks(args.ranks)
    }
    full = ["--method", "full", "--lr", str(args.full_lr), "--seeds", args.seeds]
    flags = [*classification_flags(args), *full]
    reports["full"] = compare(args, "ablation-full", flags, commands, figure2=True)
    return reports


def low_data(args: argparse.Namespace, commands: Commands) -> dict:
    few = ["--train-per-class", str(args.train_per_class)]
    return {
        f"r={r}": compare(
            args,
            f"low-data-r{r}",
            [
                *classification_flags(args),
                *few,
                *adapter_flags(args.methods, r, args.low_data_seeds),
            ],
            commands,
        )
        for r in ranks(args.low_data_ranks)
    }


def magnitude_lr(args: argparse.Namespace, commands: Commands) -> dict:
    """The control of the low-data part at its first rank: is DoRA's gain its magnitude's
    larger learning rate (3x by default)? DoRA with the magnitude at the others' rate, and LoRA."""
    r, lr = ranks(args.low_data_ranks)[0], args.control_magnitude_lr
    flags = [*classification_flags(args), "--train-per-class", str(args.train_per_class)]
    flags += ["--magnitude-lr", f"{lr:g}", *adapter_flags("dora,lora", r, args.low_data_seeds)]
    return {f"r={r}, magnitude lr {lr:g}": compare(args, f"magnitude-lr-r{r}", flags, commands)}


def causal(args: argparse.Namespace, commands: Commands) -> dict:
    model = args.lm_model or export_smollm2(Path(args.output) / "smollm2-f32")
    flags = ["--task", "causal-lm", "--model", model, "--max-steps", str(args.lm_max_steps)]
    flags += ["--max-length", str(args.lm_max_length)]
    flags += ["--data", args.lm_data] if args.lm_data else []
    return {
        f"r={r}": compare(
            args, f"causal-r{r}", [*flags, *adapter_flags(args.methods, r, args.seeds)], commands
        )
        for r in ranks(args.lm_ranks)
    }


def export_smollm2(folder: Path) -> str:
    """The bundled SmolLM2 (``--model smollm2``, a GGUF file) dequantized to float32 once into a
    transformers folder: the same weights, loaded in a second rather than twenty."""
    if not (folder / "config.json").is_file():
        from torchdora.train import load_causal_lm

        model, tokenizer = load_causal_lm("smollm2")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def figure2(args: argparse.Namespace, commands: Commands) -> dict:
    """``torchdora analyze --module-type query --checkpoints 4`` on each seed's rank-8 runs;
    each seed's ``figure2.json``, and the first seed's plot, are kept."""
    rank, reports = ranks(args.ranks)[-1], {}
    for index, seed in enumerate(args.seeds.split(",")):
        runs = [Path(args.output) / "ablation-full" / "full" / f"seed{seed}"]
        runs += [
            Path(args.output) / f"ablation-r{rank}" / method / f"seed{seed}"
            for method in FIGURE2
            if method in args.methods.split(",")
        ]
        out, keep = (
            Path(folder) / "figure2" / f"seed{seed}" for folder in (args.output, args.keep)
        )
        flags = ["--module-type", "query", "--checkpoints", "4", "--out", str(out)]
        commands.run(f"figure2/seed{seed}", ["analyze", *map(str, runs), *flags])
        keep.mkdir(parents=True, exist_ok=True)
        for file in ["figure2.json", *(["decomposition.png"] if index == 0 else [])]:
            shutil.copy2(out / file, keep / file)
        reports[f"seed {seed}"] = json.loads((out / "figure2.json").read_text())
    return reports


# ---------------------------------------------------------------------------- the tables
def stats(summary: dict) -> str:
    std = "" if summary["std"] is None else f" ± {summary['std']:.4f}"
    return f"{summary['mean']:.4f}{std}"


def paired(pair: dict, method: str) -> str:
    """``+0.0123 ± 0.0040 (dora better in 3/3)``: the mean of the per-seed differences."""
    first, favour = pair["against"], pair["favour"]
    std = "" if pair["std"] is None else f" ± {pair['std']:.4f}"
    seeds = sum(favour.values())
    return f"{pair['mean']:+.4f}{std} ({first} better in {favour[first]}/{seeds})"


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def part_tables(reports: dict, extra: dict | None = None) -> list[str]:
    """Mean ± std of each compared metric per method and group (rank), then the paired
    differences to the first method; ``extra`` (a full fine-tune) adds rows to the first."""
    groups = [g for g in reports if g != "full"]
    first = reports[groups[0]]
    metrics = [m for m in first["metrics"] if m["higher_is_better"] is not None]
    header = ["method"] + [f"{g} {m['label']}" for g in groups for m in metrics]
    rows = [
        [method]
        + [stats(reports[g]["per_method"][method][m["key"]]) for g in groups for m in metrics]
        for method in first["methods"]
    ]
    for method, summary in (extra or {}).items():
        rows.append([method] + [stats(summary[m["key"]]) for _ in groups for m in metrics])
    seeds = ",".join(map(str, first["seeds"]))
    lines = [f"mean ± std over seeds {seeds}", "", *markdown(header, rows), ""]
    rows = [
        [f"{method} − {first['methods'][0]}"]
        + [paired(reports[g]["paired"][method][m["key"]], method) for g in groups for m in metrics]
        for method in first["methods"][1:]
    ]
    return [*lines, "paired differences (same seed)", "", *markdown(header, rows)]


PAPER_SIGN = {"FT": "negative", "LoRA": "positive", "DoRA": "negative"}


def figure2_table(reports: dict) -> list[str]:
    """Per method the pooled least-squares slope of ΔM on ΔD and Pearson's r for each seed, and
    how many per-checkpoint slopes (across layers) are negative."""
    seeds = list(reports)
    methods = list(dict.fromkeys(m for r in reports.values() for m in r["methods"]))
    header = ["method", "paper", *(f"slope ({s})" for s in seeds), *(f"r ({s})" for s in seeds)]
    header.append("negative per-checkpoint slopes")
    rows = []
    for method in methods:
        found = [reports[s]["methods"][method] for s in seeds]
        per_checkpoint = [c["slope"] for f in found for c in f["per_checkpoint"]]
        rows.append(
            [method, PAPER_SIGN.get(method, "not in the paper")]
            + [f"{f['slope']:+.3g}" for f in found]
            + [f"{f['pearson']:+.3f}" for f in found]
            + [f"{sum(s < 0 for s in per_checkpoint)} of {len(per_checkpoint)}"]
        )
    return markdown(header, rows)


RUNNERS = {
    "ablation": ablation,
    "low-data": low_data,
    "magnitude-lr": magnitude_lr,
    "causal": causal,
    "figure2": figure2,
}


def main() -> None:
    args = parse()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"study.py: error: --parts {','.join(unknown)}: the parts are {','.join(PARTS)}")
    Path(args.keep).mkdir(parents=True, exist_ok=True)
    commands = Commands(Path(args.keep) / "study.json")
    results = {part: RUNNERS[part](args, commands) for part in PARTS if part in parts}
    for part, reports in results.items():
        print(f"\n## {part}\n")
        if part == "figure2":
            lines = figure2_table(reports)
        else:
            full = reports.pop("full", None)
            lines = part_tables(reports, full and {"full": full["per_method"]["full"]})
        print("\n".join(lines))
    total = sum(entry["wall_s"] for entry in commands.ran.values())
    print(f"\nwall time of the commands recorded in {commands.path}: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
