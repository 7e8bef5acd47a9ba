"""DoRA's own small parts on one CPU thread or on all: the data behind ``SmallWork``'s thresholds.

Beyond LoRA, a DoRA training step runs three kinds of work of its own: the norm's
``d_out × r`` part (:func:`torchdora.functional.norm_forward` and ``norm_backward``), the
separate ``W Aᵀ`` matmul and its gradient's matmul with ``W`` (when not stacked), and four
elementwise passes over the ``T × d_out`` output (the rescale; ``Σ_t g ⊙ direction``;
``g ⊙ m/n``). Each is small, and waking the OpenMP team for it (``OMP_WAIT_POLICY=PASSIVE``)
can cost more than the work. This script times each part on one thread and on ``--threads``,
interleaved, and checks :class:`torchdora.functional.SmallWork` against the faster one.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/thread_rule.py
"""

from __future__ import annotations

import argparse
import sys
import time

import common as C
import torch
import torch.nn.functional as F

from torchdora import functional as DF

#: (out_features, in_features): MiniLM's and SmolLM2's projections, then the issue's squares.
SHAPES = [(384, 384), (1536, 384), (384, 1536), (576, 576), (1536, 576), (1024, 1024), (4096, 4096)]


def calls_per_step(part, step_s: float) -> int:
    """How many calls of ``part`` make a step of about ``step_s`` seconds.

    One call can be microseconds: too short for the noise meter's clock ticks.
    """
    part()
    begin = time.perf_counter()
    part()
    return max(1, round(step_s / max(time.perf_counter() - begin, 1e-7)))


def on_threads(threads: int, part, calls: int):
    """``calls`` calls of ``part`` on ``threads`` threads, as one timed step; the thread count
    is switched around every call, as the library does."""

    def step() -> None:
        previous = torch.get_num_threads()
        for _ in range(calls):
            torch.set_num_threads(threads)
            part()
            torch.set_num_threads(previous)

    return step


def norm_part(out_features: int, in_features: int, rank: int):
    A, B = torch.randn(rank, in_features), 0.01 * torch.randn(out_features, rank)
    weight_a_t, grad_scale = torch.randn(rank, out_features), torch.randn(out_features)
    sq_norm, magnitude = torch.rand(out_features) + 1, torch.rand(out_features) + 1

    def part() -> None:
        _, norm, floored, q = DF.norm_forward(sq_norm, weight_a_t, A, B, magnitude, 2.0, 1e-8)
        DF.norm_backward(grad_scale, q, weight_a_t, B, magnitude, floored, norm, 2.0)

    return part


def weight_a_part(out_features: int, in_features: int, rank: int):
    weight, A = torch.randn(out_features, in_features), torch.randn(rank, in_features)
    grad_weight_a_t = torch.randn(rank, out_features)

    def part() -> None:
        F.linear(A, weight)
        grad_weight_a_t @ weight

    return part


def passes_part(tokens: int, out_features: int):
    direction, grad = torch.randn(tokens, out_features), torch.randn(tokens, out_features)
    scale, bias = torch.rand(out_features), torch.rand(out_features)

    def part() -> None:
        torch.addcmul(bias, direction, scale)
        direction.mul_(grad).sum(0)
        torch.mul(grad, scale, out=direction)

    return part


def cases(args):
    """``(part, label, work, small)``: every part at every size, and what ``SmallWork`` picks.

    The passes depend on ``T × d_out`` only, so each such size comes once.
    """
    pass_sizes = set()
    for out_f, in_f in args.shapes:
        weight = torch.empty(out_f, in_f)
        for rank in args.ranks:
            small = DF.SmallWork.of(1, weight, rank)
            label = f"{out_f}×{in_f} r={rank}"
            yield "norm", label, norm_part(out_f, in_f, rank), small.norm
            yield "weight_a", label, weight_a_part(out_f, in_f, rank), small.weight_a
        for tokens in (t for t in args.tokens if (t, out_f) not in pass_sizes):
            pass_sizes.add((tokens, out_f))
            small = DF.SmallWork.of(tokens, weight, 1)
            yield "passes", f"T={tokens} × {out_f}", passes_part(tokens, out_f), small.passes


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=C.csv(C.parse_shape), default=SHAPES)
    p.add_argument("--tokens", type=C.csv(int), default=[128, 512, 1024, 2048])
    p.add_argument("--ranks", type=C.csv(int), default=[16, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument(
        "--step-ms", type=float, default=50.0, help="length of a timed step (≫ a clock tick)"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    C.add_noise_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    device = C.setup("cpu", args.threads)
    info = C.machine(device)
    print(f"# thread_rule on {info}\n# {C.command_line()}", flush=True)
    headers = [
        "part",
        "size",
        "one thread µs",
        f"{args.threads} threads / one",
        "rule",
        "rule/best",
    ]
    rows, results = [], []
    for part_name, label, part, small in cases(args):
        calls = calls_per_step(part, args.step_ms / 1e3)
        steps = {k: on_threads(n, part, calls) for k, n in (("one", 1), ("all", args.threads))}
        times, rounds = C.interleaved(
            steps, args.reps, args.warmup, device, args.max_other_load, args.patience
        )
        med = {k: C.median(v) / calls for k, v in times.items()}
        chosen, best = ("one" if small else "all"), min(med, key=med.get)
        res = {"part": part_name, "size": label, "median_s": med, "rule": chosen, "best": best}
        res["rule_cost"], res["rounds"] = med[chosen] / med[best], rounds
        row = [part_name, label, f"{med['one'] * 1e6:.0f}", f"{med['all'] / med['one']:.2f}"]
        row += [chosen, f"{res['rule_cost']:.2f}"]
        rows.append(row)
        results.append(res)
        C.print_row(row)
    print("\n" + C.markdown_table(headers, rows))
    print("\n" + C.rule_summary(results, lambda r: f"{r['part']}, {r['size']}"))
    return C.save_results(args.json, info, results)


if __name__ == "__main__":
    main(sys.argv[1:])
