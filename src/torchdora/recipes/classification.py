"""The text-classification task (``torchdora finetune``, the main job) and the commands that use
its runs: ``evaluate`` (held-out metrics of a saved adapter or model) and ``predict``.

A classification run's ``adapter/`` also holds ``labels.json``, the class names of its head.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdora.io import AdapterFileError, load_adapter
from torchdora.io.files import read_config
from torchdora.io.peft_format import PREFIX
from torchdora.recipes.pipeline import (
    adapt_model,
    describe_model,
    fitted_max_length,
    quantize_base,
    run_statistics,
    train_and_evaluate,
    write_run,
)
from torchdora.recipes.tasks import Log, Metric, Task, register_task
from torchdora.train import (
    DataError,
    bundled_model_path,
    check_max_length,
    evaluate_classification,
    fit_max_length,
    load_bbc_news,
    load_sequence_classifier,
    load_text_classification,
    pad_collate,
    sample_per_class,
    set_seed,
    tokenize_classification,
    train_test_split,
)
from torchdora.train.pretrained import has_classification_head

if TYPE_CHECKING:
    from torchdora.recipes.settings import FinetuneConfig

LABELS_FILE = "labels.json"
HEAD_NAMES = ("classifier", "score", "pre_classifier")


def run_classification(
    config: FinetuneConfig, output: Path | None, log: Log = print
) -> dict[str, Any]:
    """Fine-tune a sequence classifier on labelled texts: ``config.model`` (default: the
    bundled MiniLM, given a new head) on ``config.data`` (default: BBC News), writing the run
    folder ``output`` if given; returns what ``metrics.json`` holds."""
    data = (
        load_bbc_news()
        if config.data is None
        else load_text_classification(config.data, config.text_column, config.label_column)
    )
    train_data, test_data = train_test_split(data, config.test_size, seed=config.split_seed)
    if not train_data.texts or not test_data.texts:
        raise DataError("the data is too small to hold out a test set; add examples")
    if config.train_per_class is not None:
        train_data = sample_per_class(train_data, config.train_per_class, seed=config.seed)
    model_dir = config.model or bundled_model_path()
    set_seed(config.seed)  # the new head's and the adapters' initial values are part of the run
    new_head = not has_classification_head(model_dir)
    model, tokenizer = load_sequence_classifier(model_dir, data.label_names)
    head = head_modules(model)
    if new_head:  # what transformers' load report says as MISSING weights, in our words
        log(
            f"new classification head ({', '.join(head)}) for the {len(data.label_names)} "
            "labels: randomly initialised, trained in full"
        )
    quantize_base(model, config, keep=head, log=log)
    analysed = adapt_model(model, config, head)
    per_label = "" if config.train_per_class is None else f" ({config.train_per_class} per label)"
    log(
        f"{describe_model(config, model, Path(model_dir).name)}; {len(train_data.texts)} train"
        f"{per_label} / {len(test_data.texts)} held-out examples, {len(data.label_names)} labels"
    )

    max_length = fitted_max_length(config, model, tokenizer, log)
    train_examples = tokenize_classification(tokenizer, train_data, max_length)
    test_examples = tokenize_classification(tokenizer, test_data, max_length)
    before, summary = train_and_evaluate(
        config,
        model,
        tokenizer,
        train_examples,
        test_examples,
        evaluate=evaluate_classification,
        describe=_accuracy_line,
        analysed=analysed,
        output=output,
        log=log,
    )
    results = {
        "method": config.method,
        "accuracy_before": before["eval_accuracy"],
        "loss_before": before["eval_loss"],
        "accuracy_after": summary["eval_accuracy"],
        "loss_after": summary["eval_loss"],
        "train_examples": len(train_data),
        **run_statistics(model, summary),
        "label_names": data.label_names,
    }
    if output is not None:
        base = str(Path(model_dir).resolve())  # evaluate/predict find it from any folder
        labels = {LABELS_FILE: json.dumps(results["label_names"]) + "\n"}
        log(write_run(output, config, model, tokenizer, results, base, adapter_files=labels))
    return results


def _accuracy_line(when: str, metrics: dict[str, float]) -> str:
    accuracy, loss = metrics["eval_accuracy"], metrics["eval_loss"]
    return f"held-out accuracy {when + ':':<7} {accuracy:.4f} (loss {loss:.4f})"


def head_modules(model) -> list[str]:
    """The classification head's module names, trained in full (``modules_to_save``)."""
    return [name for name in HEAD_NAMES if hasattr(model, name)]


CLASSIFICATION = register_task(
    Task(
        name="classification",
        run=run_classification,
        metrics=(
            Metric("accuracy_before", "acc before", None),
            Metric("accuracy_after", "acc after", True),
            Metric("loss_after", "loss after", False),
        ),
    )
)


# ---------------------------------------------------------------------------- saved runs
def load_classifier(model: str | None, adapter: str | None, max_length: int = 128):
    """``(model, tokenizer, label_names, max_length)`` for evaluation/prediction, ``max_length``
    cut to the model's positions.

    ``model`` is a folder (``None``: see :func:`model_folder`); with ``adapter`` (a run's
    ``adapter/`` folder) the adapter is loaded on top and the class names come from its
    ``labels.json``; without, they come from the model's ``config.json`` (e.g. a run's
    ``merged/`` folder).
    """
    check_max_length(max_length)  # before the model is loaded
    if adapter is not None:
        labels_path = Path(adapter) / LABELS_FILE
        label_names = read_label_names(labels_path)
    model_dir = model_folder(model, adapter)
    if adapter is None:
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} is not a transformers model folder (no config.json)")
        id2label = json.loads(config_path.read_text()).get("id2label") or {}
        label_names = [id2label[k] for k in sorted(id2label, key=int)]
        if not label_names:
            raise ValueError(f"{model_dir} has no classification labels; pass --adapter")
    classifier, tokenizer = load_sequence_classifier(model_dir, label_names)
    if adapter is not None:
        try:
            load_adapter(classifier, adapter)
        except AdapterFileError as err:
            if not any(f"{PREFIX}{head}." in str(err) for head in head_modules(classifier)):
                raise
            raise AdapterFileError(
                f"{err} (the classification head is built for the {len(label_names)} labels "
                f"in {labels_path})"
            ) from err
    return (
        classifier.eval(),
        tokenizer,
        label_names,
        fit_max_length(max_length, classifier, tokenizer),
    )


def model_folder(model: str | None, adapter: str | None) -> Path:
    """The folder to load: ``model``; without it, the local folder ``adapter``'s config records
    as its base model (``base_model_name_or_path``) if it exists, else the bundled MiniLM."""
    if model:
        return Path(model)
    base = read_config(adapter).get("base_model_name_or_path") if adapter is not None else None
    if isinstance(base, str) and Path(base).is_dir():
        return Path(base)
    return bundled_model_path()


def read_label_names(path: Path) -> list[str]:
    """The class names a classification run wrote to its adapter folder (``labels.json``)."""
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: --adapter must be the adapter folder of a text-classification "
            "run (a causal-lm run's adapter goes with `torchdora generate`)"
        )
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path} must hold a list of at least 2 class names, found {names!r:.80}")
    return names


def evaluate_saved(
    model: str | None,
    adapter: str | None,
    data: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    test_size: float = 0.2,
    split_seed: int = 0,
    max_length: int = 128,
) -> dict[str, float]:
    """Held-out metrics of a saved model/adapter: on ``data`` (all of it) if given, else on the
    bundled data's held-out split (the one ``run_finetune`` held out with the same settings)."""
    classifier, tokenizer, label_names, max_length = load_classifier(model, adapter, max_length)
    if data is None:
        _, test_data = train_test_split(load_bbc_news(), test_size, seed=split_seed)
    else:
        test_data = load_text_classification(data, text_column, label_column)
    if test_data.label_names != label_names:
        raise DataError(
            f"the data's labels {test_data.label_names} differ from the model's {label_names}"
        )
    examples = tokenize_classification(tokenizer, test_data, max_length)
    collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0)
    return evaluate_classification(classifier, examples, data_collator=collate)


def predict(
    model: str | None, adapter: str | None, texts: list[str], max_length: int = 128
) -> list[tuple[str, float]]:
    """``(label, probability)`` for each of ``texts``."""
    import torch

    classifier, tokenizer, label_names, max_length = load_classifier(model, adapter, max_length)
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = classifier(**encoded).logits.float().softmax(dim=-1)
    best = probs.max(dim=-1)
    return [(label_names[int(i)], float(p)) for p, i in zip(best.values, best.indices, strict=True)]
