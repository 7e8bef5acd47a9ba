"""QDoRA against QLoRA (and float DoRA) on one Linear on CPU: training-step time and memory.

One ``d × d`` Linear is quantized by ``--method`` (default bitsandbytes NF4) and adapted with
``QuantizedDoRALinear`` (``qdora``) or its ``use_dora=False`` variant (``qlora``); ``dora`` is
the same Linear left in float32 under ``DoRALinear``. A step is ``layer(x).backward(g)`` with
``x`` requiring a gradient (a layer inside a model). Printed (rules in ``common.py``):

- step time, median of interleaved steps, and the QDoRA / QLoRA ratio;
- memory, each variant in a fresh process: what the layer holds once built and run (weights,
  adapter, its gradients, caches: resident-set growth) and the step's own transient peak;
- the memory QDoRA saves against float DoRA.

``--peft`` adds PEFT's QLoRA and QDoRA on the same quantized base (``peft-qlora``,
``peft-qdora``) and PEFT's QDoRA after ``torchdora.accelerate_peft`` (``peft-accel``).

    .venv/bin/python benchmarks/qdora_step.py                       # 2048², T=256, r=16, nf4
    .venv/bin/python benchmarks/qdora_step.py --d 4096 --method torchao-int8
    .venv/bin/python benchmarks/qdora_step.py --peft                # and PEFT's, accelerated
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common as C
import torch
from torch import nn

from torchdora import DoRALinear, accelerate_peft
from torchdora.layers.quantized import QuantizedDoRALinear
from torchdora.quantization import QUANTIZATION_METHODS, quantize_linear

VARIANTS = ("qdora", "qlora", "dora")
PEFT_VARIANTS = ("peft-qlora", "peft-qdora", "peft-accel")
DEVICE = torch.device("cpu")


class _Holder(nn.Module):
    """The one-module model PEFT injects into."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def build(variant: str, d: int, args: argparse.Namespace) -> nn.Module:
    linear = nn.Linear(d, d)
    if variant == "dora":
        return DoRALinear.from_linear(linear, rank=args.rank)
    base = quantize_linear(linear, args.method)
    if variant in PEFT_VARIANTS:
        import peft

        config = peft.LoraConfig(
            r=args.rank, target_modules=["proj"], use_dora=variant != "peft-qlora"
        )
        holder = _Holder(base)  # marked as transformers marks a model loaded in 4 or 8 bits,
        holder.is_loaded_in_4bit = args.method in ("bnb-nf4", "bnb-fp4")  # so PEFT uses its
        holder.is_loaded_in_8bit = args.method == "bnb-int8"  # own bitsandbytes layers
        model = peft.get_peft_model(holder, config)
        if variant == "peft-accel":
            accelerate_peft(model)
        return model.base_model.model.proj
    return QuantizedDoRALinear(base, rank=args.rank, use_dora=variant == "qdora")


def inputs(d: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(args.tokens, d, requires_grad=True), torch.randn(args.tokens, d)


def make_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    return step


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        kib = next(line for line in status if line.startswith("VmRSS:")).split()[1]
    return int(kib) / 1024


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: resident growth from building and running the layer, then the peak."""
    make_step(build(args.variant, 128, args), *inputs(128, args))()  # libraries initialised
    x, grad = inputs(args.d, args)
    before = resident_mib()
    step = make_step(build(args.variant, args.d, args), x, grad)
    step()  # what the layer creates lazily (its gradients, the norm cache) is part of what it holds
    x.grad = None
    held = resident_mib() - before
    print(json.dumps({"held": held, "peak": C.peak_memory(step, DEVICE, warmup=0)}))


def memory(variant: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory-child", f"--variant={variant}"]
    command += [f"--d={args.d}", f"--tokens={args.tokens}", f"--rank={args.rank}"]
    command += [f"--method={args.method}", f"--threads={args.threads}"]
    env = {**os.environ, **C.MALLOC_ENV}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"memory child failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048, help="in_features = out_features")
    parser.add_argument("--tokens", type=int, default=256, help="T, tokens per step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--method", default="bnb-nf4", choices=QUANTIZATION_METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peft", action="store_true", help="race PEFT's QLoRA/QDoRA too")
    C.add_noise_arguments(parser)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS + PEFT_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = VARIANTS + (PEFT_VARIANTS if args.peft else ())
    C.setup("cpu", args.threads)
    if args.memory_child:
        memory_child(args)
        return

    print(f"# qdora_step on {C.machine(DEVICE)}\n# {C.command_line()}", flush=True)
    x, grad = inputs(args.d, args)
    steps = {variant: make_step(build(variant, args.d, args), x, grad) for variant in variants}
    times, rounds = C.interleaved(
        steps, args.reps, args.warmup, DEVICE, args.max_other_load, args.patience
    )
    ms = {variant: 1e3 * C.median(samples) for variant, samples in times.items()}
    del steps
    mib = {variant: memory(variant, args) for variant in variants}
    rows = [
        [
            variant,
            f"{ms[variant]:.1f}",
            f"{ms[variant] / ms['qlora']:.3f}",
            f"{mib[variant]['held']:.1f}",
            f"{mib[variant]['peak']:.1f}",
            f"{mib[variant]['held'] + mib[variant]['peak']:.1f}",
        ]
        for variant in variants
    ]
    headers = ["variant", "step ms", "÷ qlora", "held MiB", "step peak MiB", "total MiB"]
    print(
        f"\n{args.d}x{args.d}, T={args.tokens}, r={args.rank}, base {args.method}; "
        f"other processes' CPU share / rounds redone: {C.noise_note(rounds)}\n"
    )
    print(C.markdown_table(headers, rows))
    held = {variant: mib[variant]["held"] for variant in variants}
    total = {variant: held[variant] + mib[variant]["peak"] for variant in variants}
    print(
        f"\nQDoRA / QLoRA step time: {ms['qdora'] / ms['qlora']:.3f}; "
        f"QDoRA − QLoRA total memory: {total['qdora'] - total['qlora']:+.1f} MiB\n"
        f"QDoRA vs float DoRA: holds {held['dora'] - held['qdora']:.1f} MiB less "
        f"({held['qdora'] / held['dora']:.2f}×); at the step's peak "
        f"{total['dora'] - total['qdora']:+.1f} MiB"
    )
    if args.peft:
        print(
            f"accelerated / PEFT QDoRA step time: {ms['peft-accel'] / ms['peft-qdora']:.3f}; "
            f"accelerated / PEFT QLoRA: {ms['peft-accel'] / ms['peft-qlora']:.3f}; "
            f"accelerated − PEFT QDoRA total memory: "
            f"{total['peft-accel'] - total['peft-qdora']:+.1f} MiB"
        )


if __name__ == "__main__":
    main()
