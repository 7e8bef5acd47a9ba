"""LoRA vs DoRA vs DoRA with a frozen magnitude vs full fine-tuning, over ranks and seeds.

Runs the main job (``torchdora finetune``: MiniLM on BBC News, the same target modules and
training budget for every method) for each method × rank × seed, then prints the held-out
accuracy and loss as mean ± std over the seeds, one row per method and a column per rank (a
full fine-tune has no rank: it runs once per seed and its row repeats). Every run folder is
kept under ``--output`` for ``torchdora analyze``. This is what ``docs/RESULTS.md`` reports::

    .venv/bin/python examples/method_grid.py --output runs/grid --max-steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from torchdora.recipes import METHODS, FinetuneConfig, run_finetune


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="one run folder per method/rank/seed here")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", default="4,8,16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3, help="adapter runs' learning rate")
    p.add_argument("--full-lr", type=float, default=1e-3, help="the full fine-tune's")
    return p.parse_args()


def run_one(args: argparse.Namespace, method: str, rank: int, seed: int) -> dict:
    """One run's metrics; a finished run folder is read back instead of trained again."""
    name = f"{method}-s{seed}" if method == "full" else f"{method}-r{rank}-s{seed}"
    out = Path(args.output) / name
    metrics = out / "metrics.json"
    if not metrics.is_file():
        config = FinetuneConfig(
            method=method,
            rank=rank,
            alpha=2.0 * rank,
            lr=args.full_lr if method == "full" else args.lr,
            max_steps=args.max_steps,
            seed=seed,
            output=str(out),
            overwrite=True,  # an unfinished run's folder is trained again from the start
            progress="none",
        )
        run_finetune(config, log=lambda line: print(f"  {line}", flush=True))
    return json.loads(metrics.read_text())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    args = parse()
    methods = args.methods.split(",")
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    table = {}
    for method in methods:
        for rank in ranks:
            print(f"== {method} r={rank}", flush=True)
            table[method, rank] = [run_one(args, method, rank, seed) for seed in seeds]
    for metric in ("accuracy_after", "loss_after"):
        print(f"\n{metric}, mean ± std over seeds {args.seeds}\n")
        print("| method | " + " | ".join(f"r={r}" for r in ranks) + " | trainable |")
        print("|---|" + "---|" * (len(ranks) + 1))
        for method in methods:
            cells = [mean_std([run[metric] for run in table[method, r]]) for r in ranks]
            counts = sorted({table[method, r][0]["trainable_parameters"] for r in ranks})
            trainable = " / ".join(f"{count:,}" for count in counts)
            print(f"| {method} | " + " | ".join(cells) + f" | {trainable} |")


if __name__ == "__main__":
    main()
