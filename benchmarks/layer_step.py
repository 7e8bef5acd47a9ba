"""One adapted Linear, one training step: torchdora DoRA against LoRA, a frozen Linear and PEFT.

A step is ``y = layer(x); y.backward(g)`` with ``x`` requiring a gradient (as inside a network),
optionally followed by an AdamW step (``--optimizer``). Variants:

* ``lora``      torchdora ``LoRALinear`` — the reference every ratio is taken against;
* ``dora``      torchdora ``DoRALinear`` (exact norm gradient, the default);
* ``dora-detached``: ``DoRALinear(detach_norm=True)``, the norm a constant in the backward as
  in PEFT's DoRA (paper §4.3): the like-for-like comparison with ``peft-dora``; only when asked;
* ``frozen``    the bare frozen ``nn.Linear`` (what any adapter adds to);
* ``peft-lora`` / ``peft-dora``: PEFT's ``lora.Linear`` with ``use_dora`` off/on, called
  directly (no PeftModel wrapper), as ``pip install -e .[bench]`` installs it;
* ``peft-accel``: ``peft-dora`` after ``torchdora.accelerate_peft`` (PEFT's numbers, torchdora's
  computation); only when asked (``benchmarks/peft_layer.py`` races it).

Grid (default): shapes 1024x1024, 4096x4096, 8192x2048, 2048x8192 (out × in), tokens
128/512/2048/8192, ranks 8/16/64, float32 and bfloat16. ``--quick``: the cases the targets
are stated for (4096², r=16, T=128 and 2048, float32); under 3 minutes on 2 idle cores.
bfloat16 matmuls are fast only on CPUs with AVX-512 (or on a GPU); on an AVX2-only CPU they take
a slow path and the bfloat16 grid takes hours (the machine line records the CPU capability).

    .venv/bin/python benchmarks/layer_step.py --quick
    .venv/bin/python benchmarks/layer_step.py --json runs/layer_step.json     # full grid
    .venv/bin/python benchmarks/layer_step.py --device cuda                   # GPU, CUDA events
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass

import common as C
import torch
from torch import nn

from torchdora import DoRALinear, LoRALinear, accelerate_peft

DEFAULT_VARIANTS = ("lora", "dora", "frozen", "peft-lora", "peft-dora")
VARIANTS = (*DEFAULT_VARIANTS, "dora-detached", "peft-accel")
ALPHA = 16.0


@dataclass(frozen=True)
class Case:
    out_features: int
    in_features: int
    tokens: int
    rank: int
    dtype: str

    @property
    def shape(self) -> str:
        return f"{self.out_features}x{self.in_features}"

    def args(self) -> list[str]:
        return [
            f"--shapes={self.shape}",
            f"--tokens={self.tokens}",
            f"--ranks={self.rank}",
            f"--dtypes={self.dtype}",
        ]


class _Holder(nn.Module):
    """The one-module model PEFT injects into."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj


def build(variant: str, base: nn.Linear, rank: int) -> nn.Module:
    """The module a variant times, wrapping ``base`` (shared, never copied)."""
    if variant == "frozen":
        return base.requires_grad_(False)
    if variant in ("lora", "dora", "dora-detached"):
        kind = LoRALinear if variant == "lora" else DoRALinear
        detach = {"detach_norm": True} if variant == "dora-detached" else {}
        layer = kind.from_linear(base, rank=rank, alpha=ALPHA, **detach)
        lora_B = layer.lora_B
    else:
        import peft

        config = peft.LoraConfig(
            r=rank, lora_alpha=ALPHA, target_modules=["proj"], use_dora=variant != "peft-lora"
        )
        model = peft.get_peft_model(_Holder(base), config)
        if variant == "peft-accel":
            accelerate_peft(model)
        layer = model.base_model.model.proj
        lora_B = layer.lora_B["default"].weight
    with torch.no_grad():
        lora_B.normal_(std=0.01)  # B = 0 would hide nothing, but real steps have B ≠ 0
    return layer


def make_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, optimizer: bool):
    """A closure running one training step of ``module`` on ``x``."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer and params else None

    def step() -> None:
        module(x).backward(grad)
        if opt is not None:
            opt.step()
        x.grad = None  # released inside the step, so the next one starts from the same state
        for p in params:
            p.grad = None

    return step


def inputs(case: Case, device: torch.device) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    dtype = C.DTYPES[case.dtype]
    base = nn.Linear(case.in_features, case.out_features, device=device, dtype=dtype)
    x = torch.randn(case.tokens, case.in_features, device=device, dtype=dtype)
    grad = torch.randn(case.tokens, case.out_features, device=device, dtype=dtype)
    return base, x.requires_grad_(), grad


def time_case(case: Case, variants: list[str], args, device: torch.device) -> dict:
    base, x, grad = inputs(case, device)
    steps = {v: make_step(build(v, base, case.rank), x, grad, args.optimizer) for v in variants}
    times, rounds = C.interleaved(
        steps, args.reps, args.warmup, device, args.max_other_load, args.patience
    )
    return {
        "case": asdict(case),
        "median_s": {v: C.median(t) for v, t in times.items()},
        "samples_s": times,
        "rounds": rounds,
    }


def memory_child(args, device: torch.device) -> None:
    """In a fresh process: the peak of one step of ``args.variants[0]`` on the one case."""
    case = cases(args)[0]
    base, x, grad = inputs(case, device)
    step = make_step(build(args.variants[0], base, case.rank), x, grad, args.optimizer)
    C.report_peak(C.peak_memory(step, device))


def memory_case(case: Case, variants: list[str], args) -> dict[str, float]:
    common = [*case.args(), f"--device={args.device}", f"--threads={args.threads}"]
    if args.optimizer:
        common.append("--optimizer")
    if args.keep_freed_memory:
        common.append("--keep-freed-memory")
    return {
        v: C.peak_in_subprocess(__file__, [*common, f"--variants={v}", "--memory-child"])
        for v in variants
    }


def cases(args) -> list[Case]:
    grid = itertools.product(args.dtypes, args.shapes, args.tokens, args.ranks)
    return [Case(o, i, t, r, d) for d, (o, i), t, r in grid]


def available(variants: list[str]) -> list[str]:
    try:
        import peft  # noqa: F401
    except ImportError:
        dropped = [v for v in variants if v.startswith("peft")]
        if dropped:
            print(f"peft is not installed (pip install -e .[bench]): skipping {dropped}")
        return [v for v in variants if not v.startswith("peft")]
    return variants


def ratio(result: dict, num: str, den: str = "lora") -> str:
    med = result["median_s"]
    return f"{med[num] / med[den]:.3f}" if num in med and den in med else "–"


def timing_table(results: list[dict], variants: list[str]) -> str:
    others = [v for v in variants if v != "lora"]
    headers = ["dtype", "out×in", "T", "r", "LoRA ms", *(f"{v}/LoRA" for v in others)]
    if "peft-dora" in variants and "dora" in variants:
        headers.append("PEFT-DoRA/DoRA")
    headers.append("others' CPU")
    rows = []
    for res in results:
        c, med = res["case"], res["median_s"]
        row = [c["dtype"], f"{c['out_features']}×{c['in_features']}", c["tokens"], c["rank"]]
        row += [f"{med['lora'] * 1e3:.1f}", *(ratio(res, v) for v in others)]
        if "PEFT-DoRA/DoRA" in headers:
            row.append(ratio(res, "peft-dora", "dora"))
        row.append(C.noise_note(res["rounds"]))
        rows.append(row)
    return C.markdown_table(headers, rows)


def activation_mib(case: dict) -> float:
    """One ``T × d_out`` activation: what the targets allow DoRA to hold above LoRA."""
    size = torch.finfo(C.DTYPES[case["dtype"]]).bits // 8
    return case["tokens"] * case["out_features"] * size / C.MIB


def memory_table(
    results: list[dict], variants: list[str], baseline: str = "lora", label: str = "LoRA"
) -> str:
    """Each variant's peak above ``baseline``'s (called ``label``), beside one activation."""
    others = [v for v in variants if v != baseline]
    headers = ["dtype", "out×in", "T", "r", f"{label} peak MiB", "T×d_out MiB"]
    headers += [f"{v} − {label} MiB" for v in others]
    rows = []
    for res in results:
        c, peak = res["case"], res["peak_mib"]
        row = [c["dtype"], f"{c['out_features']}×{c['in_features']}", c["tokens"], c["rank"]]
        row += [f"{peak[baseline]:.1f}", f"{activation_mib(c):.1f}"]
        row += [f"{peak[v] - peak[baseline]:+.1f}" for v in others]
        rows.append(row)
    return C.markdown_table(headers, rows)


def targets(results: list[dict]) -> list[str]:
    """The issue's targets that this run's cases speak to, each with its measured value."""
    lines = []
    timed = [res for res in results if "median_s" in res]
    for res in timed:
        c = res["case"]
        if (c["out_features"], c["in_features"], c["rank"], c["dtype"]) != (4096, 4096, 16, "fp32"):
            continue
        limit = {128: 1.15, 2048: 1.05}.get(c["tokens"])
        if limit is not None and "dora" in res["median_s"]:
            value = float(ratio(res, "dora"))
            verdict = "met" if value <= limit else "NOT met"
            lines.append(f"DoRA/LoRA at T={c['tokens']}: {value:.3f} (≤ {limit}) {verdict}")
        if c["tokens"] == 128 and "peft-dora" in res["median_s"] and "dora" in res["median_s"]:
            value = float(ratio(res, "peft-dora", "dora"))
            verdict = "met" if value >= 2 else "NOT met"
            lines.append(f"PEFT-DoRA/DoRA at T=128: {value:.2f}× (≥ 2) {verdict}")
    raced = [res for res in timed if {"peft-dora", "dora"} <= set(res["median_s"])]
    if raced:
        slower = [res["case"] for res in raced if float(ratio(res, "peft-dora", "dora")) <= 1.0]
        lines.append(f"points where PEFT DoRA is not slower than ours: {len(slower)}/{len(raced)}")
        lines += [f"  {case}" for case in slower]
    measured = [res for res in results if {"lora", "dora"} <= set(res.get("peak_mib", {}))]
    if measured:
        over = [res["case"] for res in measured if memory_excess(res) > 0]
        lines.append(
            f"DoRA − LoRA peak within one T×d_out activation + O(d·r): "
            f"{len(measured) - len(over)}/{len(measured)}"
        )
        lines += [f"  over: {case}" for case in over]
    return lines


def memory_excess(res: dict, variant: str = "dora", baseline: str = "lora") -> float:
    """MiB by which ``variant``'s extra peak over ``baseline`` exceeds one ``T × d_out``
    activation plus O(d·r).

    The O(d·r) allowance is 16 ``(d_in + d_out) × r`` float32 matrices plus 1 MiB of RSS
    granularity: generous for the adapter-sized tensors, far below any d_out × d_in one.
    """
    c, peak = res["case"], res["peak_mib"]
    small = 16 * (c["in_features"] + c["out_features"]) * c["rank"] * 4 / C.MIB + 1
    return peak[variant] - peak[baseline] - activation_mib(c) - small


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the target cases only (< 3 min)")
    p.add_argument("--shapes", type=C.csv(C.parse_shape), default=None, help="OUTxIN,...")
    p.add_argument("--tokens", type=C.csv(int), default=None)
    p.add_argument("--ranks", type=C.csv(int), default=None)
    p.add_argument("--dtypes", type=C.csv(str), default=None, help="fp32,bf16,fp16")
    p.add_argument("--variants", type=C.csv(str), default=list(DEFAULT_VARIANTS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step")
    C.add_noise_arguments(p)
    C.add_malloc_argument(p)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-only", action="store_true", help="peak memory, no timing")
    p.add_argument("--json", default=None, help="write every sample and the machine here")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shapes = args.shapes or (
        [(4096, 4096)] if args.quick else [(1024, 1024), (4096, 4096), (8192, 2048), (2048, 8192)]
    )
    args.tokens = args.tokens or ([128, 2048] if args.quick else [128, 512, 2048, 8192])
    args.ranks = args.ranks or ([16] if args.quick else [8, 16, 64])
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    args.reps = args.reps or 10
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or ("lora" not in args.variants and not args.memory_child):
        p.error(f"--variants: choose from {VARIANTS}, including lora (got {args.variants})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = C.setup(args.device, args.threads, keep_freed_memory=args.keep_freed_memory)
    if args.memory_child:
        memory_child(args, device)
        return {}
    variants = available(args.variants)
    info = C.machine(device)
    print(f"# layer_step on {info}\n# {C.command_line()}", flush=True)
    results = []
    for case in cases(args):
        res = (
            {"case": asdict(case)} if args.memory_only else time_case(case, variants, args, device)
        )
        if args.memory or args.memory_only:
            res["peak_mib"] = memory_case(case, variants, args)
        results.append(res)
        row = memory_table if args.memory_only else timing_table
        print(row([res], variants).splitlines()[-1], flush=True)
        C.save_results(args.json, info, results)
    if not args.memory_only:
        print("\n## Step time, ratios to torchdora LoRA (median of", args.reps, "interleaved)\n")
        print(timing_table(results, variants))
    if args.memory or args.memory_only:
        print("\n## Peak memory of the step above torchdora LoRA\n")
        print(memory_table(results, variants))
    lines = targets(results)
    if lines:
        print("\n## Targets\n\n" + "\n".join(f"- {line}" for line in lines))
    return {"machine": info, "command": C.command_line(), "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
