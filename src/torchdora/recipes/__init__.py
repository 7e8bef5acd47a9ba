"""The application layer: ready-made fine-tuning runs (recipes) over the library.

``run_finetune(FinetuneConfig.from_dict({...}))`` is ``torchdora finetune`` as a library call;
:mod:`~torchdora.recipes.pipeline` holds the pieces every task shares, each task is one module
(:mod:`~torchdora.recipes.classification`, :mod:`~torchdora.recipes.causal_lm`) registered in
:data:`TASKS`, and :mod:`~torchdora.recipes.compare` runs several methods and seeds side by side.
"""

from torchdora.recipes import causal_lm, classification  # each registers its task
from torchdora.recipes.causal_lm import run_causal_lm
from torchdora.recipes.classification import evaluate_saved, predict, run_classification
from torchdora.recipes.generate import (
    generate_replies,
    generate_reply,
    load_generator,
    parse_adapters,
    read_prompts,
)
from torchdora.recipes.methods import METHODS, Method
from torchdora.recipes.pipeline import run_finetune
from torchdora.recipes.settings import FinetuneConfig, parse_targets
from torchdora.recipes.tasks import TASKS, Metric, Task, get_task, register_task

__all__ = [
    "METHODS",
    "TASKS",
    "FinetuneConfig",
    "Method",
    "Metric",
    "Task",
    "causal_lm",
    "classification",
    "evaluate_saved",
    "generate_replies",
    "generate_reply",
    "get_task",
    "load_generator",
    "parse_adapters",
    "parse_targets",
    "predict",
    "read_prompts",
    "register_task",
    "run_causal_lm",
    "run_classification",
    "run_finetune",
]
