"""Serving several DoRA adapters from one base: a mixed batch against the alternatives.

Eval mode, ``torch.no_grad()``, ``--adapters`` DoRA adapters (default 4) on every Linear but the
head, ``--rows`` rows each (default 8). Variants, the same rows every time:

* ``single``    one adapter active, one batch of ``adapters × rows`` rows: what the hardware does
  for a batch of that size — the reference of every ratio;
* ``mixed``     :func:`torchdora.mixed_batch`, one batch, each row with its own adapter;
* ``separate``  one batch of ``rows`` rows per adapter, ``set_adapter`` in between;
* ``merged``    one merged model per adapter (``merge_and_unload`` of a copy: what serving
  engines that refuse DoRA leave you with), each on its own rows.

Time per row (medians of interleaved rounds, paired ratios) and, per variant in a fresh process,
the resident model memory plus the forward's peak above it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mixed_batch.py --models minilm
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mixed_batch.py --models llama --layers 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys

import common as C
import model_step
import torch

from torchdora import (
    DoRAConfig,
    apply_dora,
    dora_modules,
    merge_and_unload,
    mixed_batch,
    set_adapter,
)

VARIANTS = ("single", "mixed", "separate", "merged")
LENGTHS = {"minilm": 128, "llama": 64}


def adapters_model(name: str, args) -> tuple[torch.nn.Module, list[str]]:
    model = model_step.base_model(name, args.layers).eval()
    names = [f"a{i}" for i in range(args.adapters)]
    for adapter in names:
        config = DoRAConfig(rank=args.rank, alpha=2.0 * args.rank, target_modules="all-linear")
        apply_dora(model, config, adapter_name=adapter)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in dora_modules(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(std=0.01)
                adapter.magnitude.mul_(1 + 0.01 * torch.randn_like(adapter.magnitude))
    return model, names


def inputs(name: str, rows: int, length: int | None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1000, 20000, (rows, length or LENGTHS[name]), generator=gen)


def forwards(variant: str, model, names: list[str], ids: torch.Tensor, rows: int):
    """A no-grad forward of every row for ``variant`` (see the module docstring)."""
    per_row = [n for n in names for _ in range(rows)]
    chunks = ids.split(rows)
    if variant == "single":
        set_adapter(model, names[0])
        return lambda: model(input_ids=ids)
    if variant == "mixed":

        def run_mixed():
            with mixed_batch(model, per_row):
                model(input_ids=ids)

        return run_mixed
    if variant == "separate":

        def run_separate():
            for adapter, chunk in zip(names, chunks, strict=True):
                set_adapter(model, adapter)
                model(input_ids=chunk)

        return run_separate
    merged = [merge_and_unload(copy.deepcopy(model), adapter_name=a) for a in names]
    gc.collect()
    return lambda: [m(input_ids=chunk) for m, chunk in zip(merged, chunks, strict=True)]


def model_mib(variant: str, model, adapters: int) -> float:
    """Parameters resident for ``variant``: one adapted model, or one merged model per adapter."""
    if variant == "merged":
        base = sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if ".adapters." not in n
        )
        return adapters * base / C.MIB
    return sum(p.numel() * p.element_size() for p in model.parameters()) / C.MIB


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=C.csv(str), default=["minilm", "llama"])
    p.add_argument("--layers", type=int, default=8, help="LLaMA depth (SmolLM2-135M's shape)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rows", type=int, default=8, help="rows per adapter")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="tokens per row (default: 128 MiniLM, 64 LLaMA; 1 is one decoding step's work)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    C.add_noise_arguments(p)
    return p.parse_args(argv)


def child_args(args, name: str) -> list[str]:
    return [f"--models={name}", f"--layers={args.layers}", f"--adapters={args.adapters}",
            f"--rows={args.rows}", f"--rank={args.rank}", f"--threads={args.threads}",
            *([f"--length={args.length}"] if args.length else [])]  # fmt: skip


def main(argv=None) -> dict:
    args = parse(argv)
    device = C.setup("cpu", args.threads)
    if args.memory_child:
        name = args.models[0]
        model, names = adapters_model(name, args)
        step = forwards(
            args.memory_child,
            model,
            names,
            inputs(name, args.adapters * args.rows, args.length),
            args.rows,
        )
        with torch.no_grad():
            C.report_peak(
                model_mib(args.memory_child, model, args.adapters) + C.peak_memory(step, device)
            )
        return {}
    info = C.machine(device)
    print(f"# mixed_batch on {info}\n# {C.command_line()}", flush=True)
    headers = ["model", "rows × tokens", "single ms/row", "mixed/single", "separate/single"]
    headers += ["merged/single", "mixed/separate", "others' CPU"]
    if not args.no_memory:
        headers += [f"{v} MiB" for v in VARIANTS]
    rows, results = [], []
    for name in args.models:
        model, names = adapters_model(name, args)
        total = args.adapters * args.rows
        ids = inputs(name, total, args.length)
        steps = {v: forwards(v, model, names, ids, args.rows) for v in VARIANTS}
        with torch.no_grad():
            times, rounds = C.interleaved(
                steps, args.reps, args.warmup, device, args.max_other_load, args.patience
            )
        med = {k: C.median(v) for k, v in times.items()}
        paired = {v: C.paired_ratio(times, v, "single") for v in VARIANTS[1:]}
        paired["mixed/separate"] = C.paired_ratio(times, "mixed", "separate")
        row = [
            name,
            f"{args.adapters}×{args.rows} × {ids.shape[1]}",
            f"{med['single'] / total * 1e3:.2f}",
        ]
        row += [f"{paired[v]:.3f}" for v in VARIANTS[1:]] + [f"{paired['mixed/separate']:.3f}"]
        row.append(C.noise_note(rounds))
        memory = {}
        if not args.no_memory:
            del steps, model
            gc.collect()
            memory = {
                v: C.peak_in_subprocess(__file__, [*child_args(args, name), f"--memory-child={v}"])
                for v in VARIANTS
            }
            row += [f"{memory[v]:.0f}" for v in VARIANTS]
        C.print_row(row)
        rows.append(row)
        results.append({"model": name, "median_s": med, "paired": paired, "samples_s": times,
                        "rounds": rounds, "memory_mib": memory})  # fmt: skip
    print("\n" + C.markdown_table(headers, rows))
    return C.save_results(args.json, info, results)


if __name__ == "__main__":
    main(sys.argv[1:])
