"""``torchdora`` command line: a thin front end over :mod:`torchdora.finetune`, :mod:`torchdora.io`
and :mod:`torchdora.analysis`. Bad input prints one line and exits with status 2; SIGINT/SIGTERM
during training print where the checkpoint is and exit with 130/143."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any

# torchdora.finetune (imported for the flags' help) loads all of these anyway.
from torchdora.analysis import (
    DECOMPOSITION_FILE,
    analyze_runs,
    method_correlations,
    read_decomposition,
)
from torchdora.distributed import init_from_environment, launched_with_ranks
from torchdora.finetune import (
    METHODS,
    TASKS,
    FinetuneConfig,
    evaluate_saved,
    run_finetune,
)
from torchdora.finetune import (
    predict as predict_labels,  # `predict` names a subparser in _parser
)
from torchdora.io import inspect_adapter
from torchdora.quantization import QUANTIZATION_METHODS
from torchdora.run_folder import check_run_folder
from torchdora.train.optim import RECOMMENDED_MAGNITUDE_LR_RATIO
from torchdora.train.precision import PRECISIONS
from torchdora.train.progress import PROGRESS_MODES


def _one_of(values: tuple[str, ...]) -> str:
    return "|".join(values)


FLAGS: dict[str, tuple[type, str]] = {  # finetune flags: name -> (type, help); config-file keys
    "task": (str, f"{_one_of(TASKS)}: classify texts, or tune a chat model on conversations"),
    "method": (str, f"{_one_of(METHODS)} (the last two are baselines)"),
    "rank": (int, "adapter rank r"),
    "alpha": (float, "adapter scale numerator (the update is scaled by alpha/r)"),
    "dropout": (float, "dropout on the adapter's input"),
    "targets": (
        str,
        "modules to adapt: names separated by commas, all-linear, or a regular expression "
        "(default: per architecture)",
    ),
    "model": (str, "local transformers model folder (default: the bundled model of the task)"),
    "data": (str, "CSV/TSV/JSONL file (default: the bundled data of the task)"),
    "text_column": (str, "column of --data holding the texts"),
    "label_column": (str, "column of --data holding the labels"),
    "test_size": (float, "fraction of the data held out for evaluation"),
    "max_length": (int, "tokens per text (longer texts are truncated)"),
    "epochs": (int, "passes over the training data (ignored with --max-steps)"),
    "max_steps": (int, "optimizer steps of the run"),
    "lr": (float, "learning rate"),
    "magnitude_lr": (
        float,
        f"learning rate of DoRA's magnitude (default: {RECOMMENDED_MAGNITUDE_LR_RATIO:g} x --lr)",
    ),
    "loraplus_ratio": (float, "LoRA+: lora_B's learning rate is this times --lr (1: off)"),
    "batch_size": (int, "examples per micro-batch"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "precision": (str, _one_of(PRECISIONS)),
    "seed": (int, "random seed (new weights, data order)"),
    "eval_steps": (int, "evaluate every this many steps (default: at the end only)"),
    "save_steps": (int, "write the checkpoint every this many steps (default: at the end only)"),
    "quantize": (str, f"quantize every Linear but the head first: {_one_of(QUANTIZATION_METHODS)}"),
    "output": (str, "run folder to write (default: write nothing)"),
    "resume": (str, "checkpoint/ folder of an earlier run to continue"),
    "overwrite": (bool, "remove an earlier run's files from --output first"),
    "progress": (str, f"{_one_of(PROGRESS_MODES)} (auto: a bar on a terminal, else lines)"),
}
#: Set in the environment of a ``--compare`` run, whose parent reports an interrupt.
COMPARE_RUN = "TORCHDORA_COMPARE_RUN"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchdora",
        description="Fine-tune models with DoRA (exact, factored, PEFT-compatible).",
    )
    sub = parser.add_subparsers(dest="command")
    finetune = sub.add_parser(
        "finetune",
        help="fine-tune a text classifier (default: MiniLM on BBC News, DoRA r=8), or with "
        "--task causal-lm a chat model (default: SmolLM2-135M-Instruct on the ChatterBot corpus)",
        argument_default=argparse.SUPPRESS,
    )
    for name, (kind, text) in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            finetune.add_argument(flag, dest=name, action="store_true", help=text)
        else:
            finetune.add_argument(flag, dest=name, type=kind, help=text)
    finetune.add_argument(
        "--config", dest="config_file", help="TOML/JSON/YAML file with the same keys"
    )
    finetune.add_argument("--compare", help="comma-separated methods to train side by side")

    evaluate = sub.add_parser("evaluate", help="held-out accuracy of a saved adapter or model")
    predict = sub.add_parser("predict", help="classify a few texts with a saved adapter or model")
    for command in (evaluate, predict):
        command.add_argument(
            "--model",
            help="model folder (default: the adapter's base model folder, if it exists, "
            "else the bundled MiniLM)",
        )
        command.add_argument("--adapter", help="a run's adapter/ folder")
        command.add_argument("--max-length", dest="max_length", type=int, default=128)
    evaluate.add_argument("--data", help="CSV/TSV/JSONL to evaluate on (default: held-out split)")
    evaluate.add_argument("--text-column", dest="text_column", default="text")
    evaluate.add_argument("--label-column", dest="label_column", default="label")
    predict.add_argument("texts", nargs="+", help="texts to classify")

    generate = sub.add_parser("generate", help="chat with a causal LM (and adapter), greedily")
    generate.add_argument(
        "--model", default="smollm2", help="model folder or .gguf file (default: smollm2)"
    )
    generate.add_argument("--adapter", help="a causal-LM run's adapter/ folder")
    generate.add_argument(
        "--merge", action="store_true", help="merge the adapter into the weights first"
    )
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    generate.add_argument("prompts", nargs="+", help="user messages, each answered in turn")

    inspect = sub.add_parser("inspect", help="what an adapter folder holds")
    inspect.add_argument("path")
    analyze = sub.add_parser("analyze", help="ΔM/ΔD and loss plots of training runs")
    analyze.add_argument("runs", nargs="+", help="run folders")
    analyze.add_argument("--out", default=None, help="where the PNGs go (default: first run)")
    return parser


def _load_yaml(text: str) -> Any:
    """``text`` read by PyYAML's safe loader, with YAML 1.2's floats: PyYAML follows YAML 1.1,
    whose floats need a dot and a signed exponent, so ``1e-3`` would be the string ``'1e-3'``."""
    import yaml  # optional: only for YAML config files

    class Loader(yaml.SafeLoader):  # adding a resolver to SafeLoader itself would be global
        pass

    # Added after the int resolver, which therefore still claims exponent-free integers.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
        list("-+.0123456789"),
    )
    return yaml.load(text, Loader=Loader)


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config: {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif file.suffix.lower() in (".yaml", ".yml"):
            values = _load_yaml(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise ValueError("YAML config files need PyYAML (pip install pyyaml)") from None
    except Exception as err:  # each parser has its own error type
        raise ValueError(f"--config: {file} cannot be parsed: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config: {file} must hold a table of settings")
    try:
        FinetuneConfig.check_types(values)
    except ValueError as err:
        raise ValueError(f"--config: {file}: {err}") from None
    return values


def _finetune(args: argparse.Namespace) -> int:
    import torch.distributed

    flags = vars(args).copy()
    config_file, compare = flags.pop("config_file", None), flags.pop("compare", None)
    flags.pop("command", None)
    values = _read_config_file(config_file) if config_file else {}
    values.update(flags)
    if compare is not None:
        if launched_with_ranks():
            raise ValueError("--compare runs each method in a fresh process: not under torchrun")
        return _compare(values, [m.strip() for m in compare.split(",") if m.strip()])
    config = FinetuneConfig.from_dict(values)
    distributed = init_from_environment()  # under torchrun: DDP over its ranks
    try:
        run_finetune(config)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


def _compare(values: dict[str, Any], methods: list[str]) -> int:
    """Train each method in a fresh process (so peak memory is its own) with the same seed,
    data and budget, then print a side-by-side table."""
    if values.get("task", "classification") != "classification":
        raise ValueError("--compare tabulates accuracy: it supports --task classification only")
    if not methods:
        raise ValueError("--compare needs at least one method, e.g. --compare lora,dora")
    repeated = sorted({method for method in methods if methods.count(method) > 1})
    if repeated:
        raise ValueError(f"--compare lists {', '.join(repeated)} more than once")
    if values.get("resume") is not None:
        raise ValueError("--compare starts its runs afresh: resume a run on its own")
    for method in methods:
        FinetuneConfig.from_dict({**values, "method": method})  # fail fast on bad settings
    output = values.get("output")
    root = Path(output or tempfile.mkdtemp(prefix="torchdora-compare-"))
    for method in methods:  # before the first run: not half-way through the comparison
        check_run_folder(root / method, resume=False, overwrite=bool(values.get("overwrite")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchdora-compare-") as settings:
        for method in methods:
            run = root / method
            config_path = Path(settings) / f"{method}.json"
            config_path.write_text(json.dumps({**values, "method": method, "output": str(run)}))
            print(f"== {method} ==", flush=True)
            cmd = [sys.executable, "-m", "torchdora", "finetune", "--config", str(config_path)]
            returncode = _run_compare_run(cmd)
            if returncode - 128 in (signal.SIGINT, signal.SIGTERM):
                hint = _compare_interrupted(returncode - 128, method, run)
                print(f"torchdora finetune: {hint}", file=sys.stderr)
                return returncode
            if returncode != 0:
                raise RuntimeError(f"the {method} run failed (see its output above)")
            rows.append(json.loads((run / "metrics.json").read_text()))
    header = ("method", "acc before", "acc after", "trainable", "s/step", "peak MB")
    width = max(len(m) for m in methods) + 2
    print(f"\n{{:<{width}}}{{:>12}}{{:>11}}{{:>12}}{{:>9}}{{:>9}}".format(*header))
    for row in rows:
        print(
            f"{row['method']:<{width}}{row['accuracy_before']:>12.4f}{row['accuracy_after']:>11.4f}"
            f"{row['trainable_parameters']:>12,}{row['time_per_step_s']:>9.3f}{row['peak_rss_mb']:>9.0f}"
        )
    print(f"runs in {root}")
    return 0


def _run_compare_run(cmd: list[str]) -> int:
    """Run one method of ``--compare`` and return its exit status. It runs in a session of its
    own, so Ctrl-C reaches this process alone, which passes a SIGINT or SIGTERM on to it once:
    the run checkpoints and stops as a plain run does, and leaves the report to this one."""
    child = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, COMPARE_RUN: "1"})

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _compare_interrupted(signum: int, method: str, run: Path) -> str:
    """What to do after a signal stopped the ``method`` run (folder ``run``) of ``--compare``."""
    checkpoint = run / "checkpoint"
    again = "rerun the same command with --overwrite to start the comparison again"
    if checkpoint.is_dir():
        again = (
            f"its checkpoint is in {checkpoint}: to finish that run, rerun with --method {method} "
            f"--output {run} --resume {checkpoint} in place of --compare and --output, or {again}"
        )
    name = signal.Signals(signum).name
    return f"interrupted by {name} during the {method} run of --compare; {again}"


def _evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_saved(
        args.model,
        args.adapter,
        args.data,
        args.text_column,
        args.label_column,
        max_length=args.max_length,
    )
    print(f"accuracy {metrics['eval_accuracy']:.4f}  loss {metrics['eval_loss']:.4f}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    labels = predict_labels(args.model, args.adapter, args.texts, args.max_length)
    for text, (label, prob) in zip(args.texts, labels, strict=True):
        print(f"{label}\t{prob:.3f}\t{text[:80]}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from torchdora.generate import generate_reply, load_generator

    if args.max_new_tokens < 1:  # before the model load, not after
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_generator(args.model, args.adapter, merge=args.merge)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for prompt in args.prompts:
        if len(args.prompts) > 1:
            print(f"> {prompt}", flush=True)
        generate_reply(
            model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, streamer=streamer
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    print(inspect_adapter(args.path))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    out = Path(args.out or args.runs[0])
    for path in analyze_runs(args.runs, out):
        print(f"wrote {path}")
    files = [Path(run) / DECOMPOSITION_FILE for run in args.runs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # analyze_runs has warned about these files already
        records = [r for file in files if file.is_file() for r in read_decomposition(file)]
    for method, r in method_correlations(records).items():
        print(f"{method}: corr(ΔD, ΔM) = {r:+.3f}")
    return 0


def _show_warning(command: str, message: Warning | str, *_: Any, **__: Any) -> None:
    """A warning as one line of the command's output, without Python's source location."""
    print(f"torchdora {command}: warning: {message}", file=sys.stderr)


COMMANDS = {
    "finetune": _finetune,
    "evaluate": _evaluate,
    "predict": _predict,
    "generate": _generate,
    "inspect": _inspect,
    "analyze": _analyze,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchdora`` console script and ``python -m torchdora``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers imports torchao whenever it is installed (it is, for QDoRA); keep its
    # import-time chatter about CUDA-only kernels out of the job's output.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["finetune"]  # the main job
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if as_program and args.command == "finetune":
        from torchdora.train.allocator import keep_freed_memory

        # The process is ours: keep memory between training steps. Not under torchrun: there
        # a gloo rank aborted at exit ("terminate called…") in 2 of 15 test runs with it, 0 of 20
        # without.
        if not launched_with_ranks():
            keep_freed_memory()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = partial(_show_warning, args.command)
            return COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"torchdora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or the Trainer's TrainingInterrupted
        signum = getattr(err, "signum", signal.SIGINT)
        checkpoint = getattr(err, "checkpoint", None)
        detail = f" by {signal.Signals(signum).name}"
        if hasattr(err, "step"):
            detail += f" after step {err.step}"
        if checkpoint is not None:
            detail += (
                f"; checkpoint in {checkpoint}: rerun the same command with --resume {checkpoint}"
            )
        if COMPARE_RUN not in os.environ:  # a --compare run's parent reports it
            print(f"torchdora {args.command}: interrupted{detail}", file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
