"""This checkout's DoRA against another checkout's, interleaved in one process: before/after.

Run-to-run noise on a shared machine is larger than most changes worth measuring, so a change
is judged by timing both versions side by side: torchdora is imported twice (this tree's
``src`` and ``--baseline``'s), and torchdora LoRA (this tree), the baseline's DoRA and this
tree's DoRA take turns, as in the other scripts.

    git worktree add /tmp/base HEAD     # the version to compare against
    export OMP_WAIT_POLICY=PASSIVE
    .venv/bin/python benchmarks/ab.py --baseline /tmp/base --model minilm
    .venv/bin/python benchmarks/ab.py --baseline /tmp/base --layer 1024,384,384
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import common as C
import model_step
import torch

HERE = Path(__file__).resolve().parent.parent
PAIRS = (("baseline", "lora"), ("dora", "lora"), ("dora", "baseline"))


def import_torchdora(root: Path):
    """``torchdora`` from ``root/src``, as a module object of its own."""
    for name in [n for n in sys.modules if n == "torchdora" or n.startswith("torchdora.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root / "src"))
    try:
        return importlib.import_module("torchdora")
    finally:
        sys.path.remove(str(root / "src"))


def layer_steps(libraries: dict, tokens: int, in_features: int, out_features: int, rank: int):
    x = torch.randn(tokens, in_features, requires_grad=True)
    grad = torch.randn(tokens, out_features)
    steps = {}
    for name, (lib, use_dora) in libraries.items():
        torch.manual_seed(0)
        kind = lib.DoRALinear if use_dora else lib.LoRALinear
        layer = kind(in_features, out_features, rank=rank, alpha=2.0 * rank)
        torch.nn.init.normal_(layer.lora_B, std=0.01)

        def step(layer=layer) -> None:
            layer(x).backward(grad)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        steps[name] = step
    return steps


def model_steps(libraries: dict, args, device: torch.device):
    torch.manual_seed(0)
    base = model_step.base_model(args.model, args.layers)
    inputs = model_step.batch(args.model, device)
    steps = {}
    for name, (lib, use_dora) in libraries.items():
        model_step.DoRAConfig, model_step.apply_dora = lib.DoRAConfig, lib.apply_dora
        model = model_step.adapted(base, "dora" if use_dora else "lora", args, device)
        steps[name] = model_step.make_step(model, inputs, optimizer=False)
    return steps


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="root of the other checkout")
    p.add_argument("--model", choices=sorted(model_step.SHAPES), default=None)
    p.add_argument("--layers", type=int, default=8, help="LLaMA depth")
    p.add_argument("--layer", type=C.csv(int), default=None, help="T,in_features,out_features")
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    C.add_noise_arguments(p)
    C.add_malloc_argument(p)
    args = p.parse_args(argv)
    if (args.model is None) == (args.layer is None):
        p.error("give exactly one of --model and --layer")
    if not (args.baseline / "src" / "torchdora").is_dir():
        p.error(f"--baseline {args.baseline} has no src/torchdora")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    device = C.setup("cpu", args.threads, keep_freed_memory=args.keep_freed_memory)
    baseline, current = import_torchdora(args.baseline), import_torchdora(HERE)
    libraries = {"lora": (current, False), "baseline": (baseline, True), "dora": (current, True)}
    if args.layer:
        steps = layer_steps(libraries, *args.layer, args.rank)
    else:
        steps = model_steps(libraries, args, device)
    info = C.machine(device)
    print(f"# ab on {info}\n# {C.command_line()}", flush=True)
    times, rounds = C.interleaved(
        steps, args.reps, args.warmup, device, args.max_other_load, args.patience
    )
    med = {k: C.median(v) for k, v in times.items()}
    case = args.model or "×".join(map(str, args.layer))
    paired = {k: C.paired_ratio(times, *k) for k in PAIRS}
    headers = ["case", "LoRA ms", "baseline DoRA/LoRA", "DoRA/LoRA", "DoRA/baseline"]
    headers += [f"paired {a}/{b}" for a, b in PAIRS] + ["others' CPU"]
    row = [case, f"{med['lora'] * 1e3:.1f}", f"{med['baseline'] / med['lora']:.3f}"]
    row += [f"{med['dora'] / med['lora']:.3f}", f"{med['dora'] / med['baseline']:.3f}"]
    row += [f"{paired[k]:.3f}" for k in PAIRS]
    print("\n" + C.markdown_table(headers, [[*row, C.noise_note(rounds)]]))
    result = {"case": case, "median_s": med, "samples_s": times, "rounds": rounds}
    result["paired_ratio"] = {f"{a}/{b}": value for (a, b), value in paired.items()}
    return C.save_results(args.json, info, [result])


if __name__ == "__main__":
    main(sys.argv[1:])
