"""``torchdora`` command line: a thin front end over :mod:`torchdora.recipes`, :mod:`torchdora.io`
and :mod:`torchdora.analysis`. Bad input prints one line and exits with status 2; SIGINT/SIGTERM
during training print where the checkpoint is and exit with 130/143.

The ``finetune`` flags are generated from the fields of :class:`~torchdora.recipes.FinetuneConfig`
(:func:`setting_flags`); ``docs/cli.md`` holds the same reference (:func:`settings_table`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from torchdora.analysis import PAPER_CHECKPOINTS, RELATIONS_FILE, analyze_runs, format_relations
from torchdora.distributed import init_from_environment, launched_with_ranks
from torchdora.io import inspect_adapter
from torchdora.recipes import TASKS, FinetuneConfig, evaluate_saved, run_finetune
from torchdora.recipes import predict as predict_labels  # `predict` names a subparser
from torchdora.recipes.compare import COMPARE_RUN, parse_methods, parse_seeds, run_comparison

#: ``finetune`` options that are no setting of one run: flag -> (metavar, help).
STUDY_FLAGS = {
    "--config": (
        "FILE",
        "TOML/JSON/YAML file of settings: the keys are the flags' names, with - or _",
    ),
    "--compare": (
        "METHODS",
        "comma-separated methods to train side by side, each in a fresh process into "
        "DIR/<method> (e.g. lora,dora)",
    ),
    "--seeds": (
        "SEEDS",
        "comma-separated seeds: every method at every seed into DIR/<method>/seed<k>, "
        "reported as mean ± std and paired differences (e.g. 0,1,2)",
    ),
}


# ---------------------------------------------------------------------------- the flags
def setting_flags() -> Iterator[tuple[str, dict[str, Any]]]:
    """``(flag, argparse options)`` of every :class:`~torchdora.recipes.FinetuneConfig` field."""
    hints = typing.get_type_hints(FinetuneConfig)
    for spec in dataclasses.fields(FinetuneConfig):
        options: dict[str, Any] = {"dest": spec.name, "help": describe_setting(spec)}
        kind = _flag_type(hints[spec.name])
        if kind is bool:
            options["action"] = "store_true"
        else:
            options.update(type=kind, metavar=_metavar(spec))
        yield "--" + spec.name.replace("_", "-"), options


def describe_setting(spec: dataclasses.Field) -> str:
    """A setting's help: its allowed values, what it does, and its default (and any task's)."""
    text = spec.metadata["help"]
    if spec.metadata["choices"] is not None:
        text = f"{'|'.join(spec.metadata['choices']())}: {text}"
    defaults = [
        f"{task.name}: {_show(task.defaults[spec.name])}"
        for task in TASKS.values()
        if spec.name in task.defaults
    ]
    default = spec.metadata["default_help"]
    if default is None and spec.default is not None and spec.default is not False:
        default = _show(spec.default)
    if default is not None:
        defaults.insert(0, f"default: {default}")
    return f"{text} ({'; '.join(defaults)})" if defaults else text


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag_type(hint: Any) -> Callable[[str], Any]:
    """What turns a flag's text into the field's value: ``int``, ``float``, ``str``, ``bool``
    (a switch); an optional number also takes ``none``."""
    if not isinstance(hint, types.UnionType):
        return hint
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    if len(kinds) > 1 or kinds[0] not in (int, float):  # targets: a list or a string
        return str
    return partial(_number_or_none, kinds[0])


def _number_or_none(kind: type, text: str) -> Any:
    return None if text.lower() == "none" else kind(text)


def _metavar(spec: dataclasses.Field) -> str:
    return "NAME" if spec.metadata["choices"] is not None else spec.name.upper()


def settings_table() -> str:
    """The ``finetune`` flags as the Markdown table ``docs/cli.md`` holds."""
    rows = ["| flag | what it sets |", "| --- | --- |"]
    for flag, options in setting_flags():
        value = "" if options.get("action") else f" {options['metavar']}"
        text = options["help"].replace("|", "\\|")
        rows.append(f"| `{flag}{value}` | {text} |")
    for flag, (metavar, text) in STUDY_FLAGS.items():
        rows.append(f"| `{flag} {metavar}` | {text} |")
    return "\n".join(rows)


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
    for flag, options in setting_flags():
        finetune.add_argument(flag, **{**options, "help": options["help"].replace("%", "%%")})
    for flag, (metavar, text) in STUDY_FLAGS.items():
        dest = "config_file" if flag == "--config" else flag.strip("-")
        finetune.add_argument(flag, dest=dest, metavar=metavar, help=text.replace("%", "%%"))

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
    generate.add_argument(
        "--adapter",
        action="append",
        help="a causal-LM run's adapter/ folder, or NAME=FOLDER; repeat it for several adapters "
        "(with --prompts)",
    )
    generate.add_argument(
        "--prompts",
        dest="prompts_file",
        help='JSONL file of {"adapter": NAME or null, "prompt": ...} lines, answered together in '
        "mixed-adapter batches",
    )
    generate.add_argument(
        "--merge", action="store_true", help="merge the adapter into the weights first"
    )
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    generate.add_argument("prompts", nargs="*", help="user messages, each answered in turn")

    inspect = sub.add_parser("inspect", help="what an adapter folder holds")
    inspect.add_argument("path")
    analyze = sub.add_parser("analyze", help="ΔM/ΔD and loss plots of training runs")
    analyze.add_argument("runs", nargs="+", help="run folders")
    analyze.add_argument("--out", default=None, help="where the files go (default: first run)")
    analyze.add_argument(
        "--module-type",
        dest="module_type",
        metavar="NAME",
        help="only the layers of this type, e.g. query (the paper's figure 2; default: all)",
    )
    analyze.add_argument(
        "--checkpoints",
        type=int,
        metavar="N",
        help=f"only N checkpoints per run, the last and N-1 evenly spread before it (the "
        f"paper's figure 2: {PAPER_CHECKPOINTS}; default: every recorded step)",
    )
    return parser


# ---------------------------------------------------------------------------- config files
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


# ---------------------------------------------------------------------------- the commands
def _finetune(args: argparse.Namespace) -> int:
    import torch.distributed

    flags = vars(args).copy()
    flags.pop("command", None)
    config_file = flags.pop("config_file", None)
    compare, seeds = flags.pop("compare", None), flags.pop("seeds", None)
    values = _read_config_file(config_file) if config_file else {}
    values.update(flags)
    if compare is not None or seeds is not None:
        if launched_with_ranks():
            raise ValueError(
                "--compare and --seeds run each run in a fresh process: not under torchrun"
            )
        methods = parse_methods(compare) if compare is not None else None
        return run_comparison(values, methods, parse_seeds(seeds) if seeds is not None else None)
    config = FinetuneConfig.from_dict(values)
    distributed = init_from_environment()  # under torchrun: DDP over its ranks
    try:
        run_finetune(config)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


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

    from torchdora.recipes import generate_reply, load_generator, parse_adapters, read_prompts

    if args.max_new_tokens < 1:  # before the model load, not after
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    adapters = parse_adapters(args.adapter)
    if args.prompts_file is not None:
        if args.prompts:
            raise ValueError("give the prompts either as arguments or in --prompts FILE, not both")
        requests = read_prompts(args.prompts_file, list(adapters))
        model, tokenizer = load_generator(args.model, adapters, merge=args.merge)
        _answer_together(model, tokenizer, requests, args.max_new_tokens)
        return 0
    if not args.prompts:
        raise ValueError("give one or more prompts, or --prompts FILE")
    if len(adapters) > 1:
        raise ValueError(
            "several --adapter need --prompts FILE, whose lines say which adapter answers which "
            "prompt"
        )
    model, tokenizer = load_generator(args.model, adapters, merge=args.merge)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for prompt in args.prompts:
        if len(args.prompts) > 1:
            print(f"> {prompt}", flush=True)
        generate_reply(
            model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, streamer=streamer
        )
    return 0


def _answer_together(model, tokenizer, requests, max_new_tokens: int) -> None:
    """Answer every ``(adapter, prompt)`` in one mixed-adapter batch, printing each answer with
    its adapter's name as soon as it is complete."""
    from torchdora.recipes import generate_replies

    def show(index: int, text: str) -> None:
        adapter, prompt = requests[index]
        print(f"[{adapter or 'base'}] > {prompt}\n{text}\n", flush=True)

    generate_replies(model, tokenizer, requests, max_new_tokens=max_new_tokens, on_answer=show)


def _inspect(args: argparse.Namespace) -> int:
    print(inspect_adapter(args.path))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    out = Path(args.out or args.runs[0])
    written = analyze_runs(
        args.runs, out, module_type=args.module_type, checkpoints=args.checkpoints
    )
    for path in written:
        print(f"wrote {path}")
    if out / RELATIONS_FILE in written:
        summary = json.loads((out / RELATIONS_FILE).read_text())
        layers = f"{args.module_type} layers" if args.module_type else "all layers"
        for line in format_relations(summary["methods"], layers):
            print(line)
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


def _quiet_dependencies() -> None:
    """The program's output is its own lines: ``transformers`` reports only errors and shows no
    progress bars of its own (its load report lists the new classification head as missing,
    which the run says in its words). Set in the environment before ``transformers`` is
    imported; ``TRANSFORMERS_VERBOSITY=warning`` or ``HF_HUB_DISABLE_PROGRESS_BARS=0`` bring
    them back."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
    if as_program:  # the process is ours to configure
        _quiet_dependencies()
        if args.command == "finetune" and not launched_with_ranks():
            from torchdora.train.allocator import keep_freed_memory

            # Keep memory between training steps. Not under torchrun, where with it a gloo
            # rank can abort at exit ("terminate called…").
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
        if COMPARE_RUN not in os.environ:  # a comparison's parent process reports it
            print(f"torchdora {args.command}: interrupted{detail}", file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
