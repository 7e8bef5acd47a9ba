"""Inference: an eval-mode, ``torch.no_grad()`` forward of one adapted Linear.

Variants, all on the same frozen ``nn.Linear``:

* ``lora``         torchdora ``LoRALinear``, unmerged — the reference of every ratio;
* ``dora``         torchdora ``DoRALinear``, unmerged, after its first call: ``m/n`` is cached
  until ``W``, ``A``, ``B`` or ``m`` changes, so only the scaling pass is extra;
* ``dora-first``   the same call right after a parameter changed (the cache refills: one
  ``W Aᵀ`` pass and the ``d_out × r`` norm maths), i.e. the first call after a training step;
* ``dora-merged``  ``DoRALinear`` after ``merge()``: it runs its base layer alone;
* ``base``         the bare ``nn.Linear`` (what ``merge_and_unload`` returns);
* ``peft-lora`` / ``peft-dora``: PEFT's layer in eval mode, unmerged, for reference.

    .venv/bin/python benchmarks/inference.py --quick
    .venv/bin/python benchmarks/inference.py               # 4 shapes × T 1…2048, fp32 + bf16
"""

from __future__ import annotations

import argparse
import itertools
import sys

import common as C
import torch
from layer_step import build
from torch import nn

VARIANTS = ("lora", "dora", "dora-first", "dora-merged", "base", "peft-lora", "peft-dora")


def make_forward(variant: str, base: nn.Linear, rank: int, x: torch.Tensor):
    if variant == "base":
        module = base
    elif variant.startswith("dora"):
        module = build("dora", base, rank)
        if variant == "dora-merged":
            module.merge()
    else:
        module = build(variant, base, rank)
    module.eval()

    def forward() -> None:
        with torch.no_grad():
            if variant == "dora-first":
                module.lora_B.add_(0.0)  # a parameter "changed": the cached m/n is stale
            module(x)

    return forward


def time_case(shape, tokens, rank, dtype, variants, args, device) -> dict:
    out_features, in_features = shape
    dt = C.DTYPES[dtype]
    # One base per variant: merging writes into the base weight.
    forwards = {}
    for v in variants:
        torch.manual_seed(0)
        base = nn.Linear(in_features, out_features, device=device, dtype=dt)
        x = torch.randn(tokens, in_features, device=device, dtype=dt)
        forwards[v] = make_forward(v, base, rank, x)
    times, rounds = C.interleaved(
        forwards, args.reps, args.warmup, device, args.max_other_load, args.patience
    )
    return {
        "case": {"shape": f"{out_features}x{in_features}", "tokens": tokens, "rank": rank},
        "dtype": dtype,
        "median_s": {v: C.median(t) for v, t in times.items()},
        "rounds": rounds,
    }


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4096², r=16, T 1/128/2048, fp32")
    p.add_argument("--shapes", type=C.csv(C.parse_shape), default=None)
    p.add_argument("--tokens", type=C.csv(int), default=None)
    p.add_argument("--ranks", type=C.csv(int), default=None)
    p.add_argument("--dtypes", type=C.csv(str), default=None)
    p.add_argument("--variants", type=C.csv(str), default=list(VARIANTS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    C.add_noise_arguments(p)
    args = p.parse_args(argv)
    full_shapes = [(1024, 1024), (4096, 4096), (8192, 2048), (2048, 8192)]
    args.shapes = args.shapes or ([(4096, 4096)] if args.quick else full_shapes)
    args.tokens = args.tokens or ([1, 128, 2048] if args.quick else [1, 16, 128, 2048])
    args.ranks = args.ranks or [16]
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    if "lora" not in args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants: choose from {VARIANTS}, including lora")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    device = C.setup(args.device, args.threads)
    info = C.machine(device)
    variants = [v for v in args.variants if not v.startswith("peft") or "peft" in info]
    print(f"# inference on {info}\n# {C.command_line()}", flush=True)
    others = [v for v in variants if v != "lora"]
    headers = ["dtype", "out×in", "T", "r", "LoRA ms", *(f"{v}/LoRA" for v in others)]
    headers.append("others' CPU")
    rows, results = [], []
    grid = itertools.product(args.dtypes, args.shapes, args.tokens, args.ranks)
    for dtype, shape, tokens, rank in grid:
        res = time_case(shape, tokens, rank, dtype, variants, args, device)
        med = res["median_s"]
        row = [dtype, f"{shape[0]}×{shape[1]}", tokens, rank, f"{med['lora'] * 1e3:.2f}"]
        row += [f"{med[v] / med['lora']:.3f}" for v in others]
        row.append(C.noise_note(res["rounds"]))
        rows.append(row)
        results.append(res)
        C.print_row(row)
    print(f"\n## No-grad eval forward, ratios to LoRA (median of {args.reps} interleaved)\n")
    print(C.markdown_table(headers, rows))
    return C.save_results(args.json, info, results)


if __name__ == "__main__":
    main(sys.argv[1:])
