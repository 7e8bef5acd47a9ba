"""Does ``torch.compile`` of DoRA's small ``d_out × r`` part pay?

The step's small part is :func:`torchdora.functional.norm_forward` (the factored row norm and
``m/n``) and :func:`torchdora.functional.norm_backward`. This script times both eagerly (on
all threads) and compiled (inductor), interleaved,
records the compile time, and sets the saving against a whole DoRA training step of the same
layer at the smallest token count (where it weighs most).

    .venv/bin/python benchmarks/compile_small.py
"""

from __future__ import annotations

import argparse
import sys
import time

import common as C
import torch

from torchdora import DoRALinear
from torchdora import functional as DF


def small_part(fwd, bwd, tensors, scaling: float, eps: float):
    c, weight_a_t, lora_A, lora_B, magnitude, grad_scale = tensors

    def run() -> None:
        _, norm, floored, q = fwd(c, weight_a_t, lora_A, lora_B, magnitude, scaling, eps)
        bwd(grad_scale, q, weight_a_t, lora_B, magnitude, floored, norm, scaling)

    return run


def dora_step(out_features: int, in_features: int, rank: int, tokens: int):
    layer = DoRALinear(in_features, out_features, rank=rank)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.01)
    x = torch.randn(tokens, in_features, requires_grad=True)
    grad = torch.randn(tokens, out_features)

    def step() -> None:
        layer(x).backward(grad)
        x.grad = layer.lora_A.grad = layer.lora_B.grad = layer.magnitude.grad = None

    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=C.csv(C.parse_shape), default=[(4096, 4096), (8192, 2048)])
    p.add_argument("--ranks", type=C.csv(int), default=[8, 16, 64])
    p.add_argument("--tokens", type=int, default=128, help="tokens of the reference step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    C.add_noise_arguments(p)
    args = p.parse_args(argv)
    device = C.setup("cpu", args.threads)
    info = C.machine(device)
    print(f"# compile_small on {info}\n# {C.command_line()}", flush=True)
    rows, results = [], []
    for (out_f, in_f), rank in [(s, r) for s in args.shapes for r in args.ranks]:
        c = torch.rand(out_f) + 1
        tensors = (
            c,
            torch.randn(rank, out_f),
            torch.randn(rank, in_f) / in_f**0.5,
            0.01 * torch.randn(out_f, rank),
            c.sqrt(),
            torch.randn(out_f),
        )
        fwd = torch.compile(DF.norm_forward, dynamic=False)
        bwd = torch.compile(DF.norm_backward, dynamic=False)
        compiled = small_part(fwd, bwd, tensors, 2.0, 1e-8)
        begin = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - begin
        eager = small_part(DF.norm_forward, DF.norm_backward, tensors, 2.0, 1e-8)
        steps = {
            "eager": eager,
            "compiled": compiled,
            "step": dora_step(out_f, in_f, rank, args.tokens),
        }
        times, _ = C.interleaved(steps, args.reps, 3, device, args.max_other_load, args.patience)
        med = {k: C.median(v) for k, v in times.items()}
        saving = med["eager"] - med["compiled"]
        row = [f"{out_f}×{in_f}", rank, f"{med['eager'] * 1e6:.0f}"]
        row.append(f"{med['compiled'] * 1e6:.0f}")
        row += [f"{saving / med['step']:+.2%}", f"{compile_s:.1f}", f"{med['step'] * 1e3:.1f}"]
        rows.append(row)
        results.append(
            {"shape": [out_f, in_f], "rank": rank, "median_s": med, "compile_s": compile_s}
        )
        C.print_row(row)
    headers = ["out×in", "r", "eager µs", "compiled µs"]
    headers += ["saving over eager / step", "compile s"]
    headers.append(f"DoRA step ms (T={args.tokens})")
    print("\n" + C.markdown_table(headers, rows))
    return C.save_results(args.json, info, results)


if __name__ == "__main__":
    main(sys.argv[1:])
