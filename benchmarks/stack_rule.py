"""Stacked ``[x; A]`` frozen matmul against two separate ones: the data behind the rule.

``torchdora.functional.dora_linear`` needs ``W x`` and ``W Aᵀ``. It can run one matmul over the
stacked input ``[x; A]`` (one pass over ``W``, but ``x`` is copied into the stacked input) or
two (no copy, but a second pass over ``W`` for only ``r`` rows). The backward is the same
either way. This script times the DoRA training step both ways, interleaved, and checks
:func:`torchdora.functional.stack_base_matmul` against the winner at every grid point.

    .venv/bin/python benchmarks/stack_rule.py            # full grid (long)
    .venv/bin/python benchmarks/stack_rule.py --quick    # 4096², r=16, T=128…8192, fp32
"""

from __future__ import annotations

import argparse
import itertools
import sys

import common as C
import torch

from torchdora import functional as DF


def make_step(weight, bias, adapter, x, grad, stack: bool):
    lora_A, lora_B, magnitude, sq_norm = adapter

    def step() -> None:
        out = DF.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 2.0, sq_norm, stack=stack)
        out.backward(grad)
        x.grad = lora_A.grad = lora_B.grad = magnitude.grad = None

    return step


def time_case(out_features, in_features, tokens, rank, dtype, args, device) -> dict:
    dt = C.DTYPES[dtype]
    weight = torch.randn(out_features, in_features, device=device, dtype=dt) / in_features**0.5
    bias = torch.zeros(out_features, device=device, dtype=dt)
    factory = {"device": device, "dtype": torch.float32}
    adapter = (
        (torch.randn(rank, in_features, **factory) / in_features**0.5).requires_grad_(),
        (0.01 * torch.randn(out_features, rank, **factory)).requires_grad_(),
        weight.float().norm(dim=1).requires_grad_(),
        DF.weight_sq_row_norm(weight),
    )
    x = torch.randn(tokens, in_features, device=device, dtype=dt, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dt)
    steps = {
        "stacked": make_step(weight, bias, adapter, x, grad, True),
        "separate": make_step(weight, bias, adapter, x, grad, False),
    }
    times, rounds = C.interleaved(
        steps, args.reps, args.warmup, device, args.max_other_load, args.patience
    )
    med = {k: C.median(v) for k, v in times.items()}
    rule = DF.stack_base_matmul(tokens, weight, rank)
    best = "stacked" if med["stacked"] <= med["separate"] else "separate"
    chosen = "stacked" if rule else "separate"
    return {
        "case": {"shape": f"{out_features}x{in_features}", "tokens": tokens, "rank": rank},
        "dtype": dtype,
        "median_s": med,
        "rule": chosen,
        "best": best,
        "rule_cost": med[chosen] / med[best],
        "rounds": rounds,
    }


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", type=C.csv(C.parse_shape), default=None)
    p.add_argument("--tokens", type=C.csv(int), default=None)
    p.add_argument("--ranks", type=C.csv(int), default=None)
    p.add_argument("--dtypes", type=C.csv(str), default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    C.add_noise_arguments(p)
    C.add_malloc_argument(p)
    args = p.parse_args(argv)
    full_shapes = [(1024, 1024), (4096, 4096), (8192, 2048), (2048, 8192)]
    args.shapes = args.shapes or ([(4096, 4096)] if args.quick else full_shapes)
    args.tokens = args.tokens or [128, 512, 2048, 8192]
    args.ranks = args.ranks or ([16] if args.quick else [8, 16, 64])
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    device = C.setup(args.device, args.threads, keep_freed_memory=args.keep_freed_memory)
    info = C.machine(device)
    print(f"# stack_rule on {info}\n# {C.command_line()}", flush=True)
    headers = ["dtype", "out×in", "T", "r", "stacked ms", "separate/stacked", "rule", "rule/best"]
    rows, results = [], []
    grid = itertools.product(args.dtypes, args.shapes, args.tokens, args.ranks)
    for dtype, (out_f, in_f), tokens, rank in grid:
        res = time_case(out_f, in_f, tokens, rank, dtype, args, device)
        med = res["median_s"]
        row = [dtype, f"{out_f}×{in_f}", tokens, rank, f"{med['stacked'] * 1e3:.1f}"]
        row += [f"{med['separate'] / med['stacked']:.3f}", res["rule"], f"{res['rule_cost']:.3f}"]
        rows.append(row)
        results.append(res)
        C.print_row(row)
    print("\n" + C.markdown_table(headers, rows))
    print("\n" + C.rule_summary(results, lambda r: f"{r['case']} {r['dtype']}"))
    return C.save_results(args.json, info, results)


if __name__ == "__main__":
    main(sys.argv[1:])
