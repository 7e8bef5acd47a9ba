"""PEFT's DoRA accelerated in place: one adapted Linear, one training step, side by side.

Races PEFT's LoRA, PEFT's DoRA, the same PEFT DoRA layer after ``torchdora.accelerate_peft``
(PEFT's numbers, torchdora's factored norm) and torchdora's own ``DoRALinear``, with torchdora's
``LoRALinear`` timed alongside; the step, the interleaving, the noise control and the
fresh-process peak memory are ``layer_step.py``'s. Ratios are to PEFT's LoRA and PEFT's DoRA.

Grid (default): 4096 × 4096, T = 128/512/2048/4096, r = 8/16/64, float32 and bfloat16.
``--quick``: 4096², r = 16, T = 128 and 2048, float32 (the cases the targets are stated for).

    .venv/bin/python benchmarks/peft_layer.py --quick
    .venv/bin/python benchmarks/peft_layer.py --json runs/peft_layer.json
"""

from __future__ import annotations

import sys

import common as C
import layer_step as L

VARIANTS = ["lora", "peft-lora", "peft-dora", "peft-accel", "dora"]
#: (T, limit on accelerated / PEFT-DoRA, limit on accelerated / PEFT-LoRA) at 4096², r=16, fp32
TARGETS = ((128, 0.5, 1.15), (2048, 0.8, 1.05))


def parse(argv: list[str]):
    defaults = ["--shapes=4096x4096", f"--variants={','.join(VARIANTS)}"]
    if "--quick" not in argv:
        defaults += ["--tokens=128,512,2048,4096", "--ranks=8,16,64", "--dtypes=fp32,bf16"]
    given = {arg.split("=")[0] for arg in argv}
    return L.parse([d for d in defaults if d.split("=")[0] not in given] + argv)


def ratios(res: dict) -> list[str]:
    return [
        L.ratio(res, "peft-dora", "peft-lora"),
        L.ratio(res, "peft-accel", "peft-lora"),
        L.ratio(res, "dora", "peft-lora"),
        L.ratio(res, "lora", "peft-lora"),
        L.ratio(res, "peft-accel", "peft-dora"),
    ]


def timing_table(results: list[dict]) -> str:
    headers = [
        "dtype", "out×in", "T", "r", "PEFT-LoRA ms", "PEFT-DoRA/PEFT-LoRA",
        "accelerated/PEFT-LoRA", "torchdora DoRA/PEFT-LoRA", "torchdora LoRA/PEFT-LoRA",
        "**accelerated/PEFT-DoRA**", "others' CPU",
    ]  # fmt: skip
    rows = []
    for res in results:
        c = res["case"]
        row = [c["dtype"], f"{c['out_features']}×{c['in_features']}", c["tokens"], c["rank"]]
        row += [f"{res['median_s']['peft-lora'] * 1e3:.1f}", *ratios(res)]
        rows.append([*row, C.noise_note(res["rounds"])])
    return C.markdown_table(headers, rows)


def targets(results: list[dict]) -> list[str]:
    """The issue's targets this run speaks to, each with its measured value."""
    lines = []
    for res in results:
        c = res["case"]
        if (c["out_features"], c["in_features"], c["rank"], c["dtype"]) != (4096, 4096, 16, "fp32"):
            continue
        for tokens, vs_dora, vs_lora in TARGETS:
            if c["tokens"] != tokens or "median_s" not in res:
                continue
            for den, limit in (("peft-dora", vs_dora), ("peft-lora", vs_lora)):
                value = float(L.ratio(res, "peft-accel", den))
                verdict = "met" if value <= limit else "NOT met"
                lines.append(f"accelerated/{den} at T={tokens}: {value:.3f} (≤ {limit}) {verdict}")
    measured = [res for res in results if "peak_mib" in res]
    if measured:
        over = [
            res["case"] for res in measured if L.memory_excess(res, "peft-accel", "peft-lora") > 0
        ]
        lines.append(
            "accelerated − PEFT-LoRA peak within one T×d_out activation + O(d·r): "
            f"{len(measured) - len(over)}/{len(measured)}"
        )
        lines += [f"  over: {case}" for case in over]
    return lines


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = C.setup(args.device, args.threads, keep_freed_memory=args.keep_freed_memory)
    variants = L.available(args.variants)
    if not {"peft-lora", "peft-dora", "peft-accel"} <= set(variants):
        print("peft_layer.py races PEFT: pip install -c constraints.txt -e '.[bench]'")
        return {}
    info = C.machine(device)
    print(f"# peft_layer on {info}\n# {C.command_line()}", flush=True)
    results = []
    for case in L.cases(args):
        res = L.time_case(case, variants, args, device)
        if args.memory:
            res["peak_mib"] = L.memory_case(case, variants, args)
        results.append(res)
        print(timing_table([res]).splitlines()[-1], flush=True)
        C.save_results(args.json, info, results)
    print(f"\n## Step time, ratios (median of {args.reps} interleaved)\n")
    print(timing_table(results))
    if args.memory:
        print("\n## Peak memory of the step above PEFT's LoRA\n")
        print(L.memory_table(results, VARIANTS[1:], "peft-lora", "PEFT-LoRA"))
    print("\n## Targets\n\n" + "\n".join(f"- {line}" for line in targets(results)))
    return {"machine": info, "command": C.command_line(), "results": results}


if __name__ == "__main__":
    main()
