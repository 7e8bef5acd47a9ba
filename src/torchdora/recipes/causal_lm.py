"""The causal-LM instruction fine-tune behind ``torchdora finetune --task causal-lm``.

:func:`run_causal_lm` trains an adapter on chat conversations (loss on the assistant's tokens
only), reports held-out loss and perplexity and a few greedy answers to held-out prompts before
and after, and writes the run folder (see :mod:`torchdora.recipes.pipeline`; ``metrics.json``
holds the sample answers). With ``quantize`` (QDoRA) every Linear but the output head is
quantized before the adapters are added.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdora.model.targeting import output_head_names
from torchdora.recipes.generate import generate_reply
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
    SMOLLM2,
    evaluate_causal_lm,
    first_prompt,
    load_causal_lm,
    load_chatterbot_corpus,
    load_conversations,
    set_seed,
    split_conversations,
    tokenize_conversations,
)

if TYPE_CHECKING:
    from torch import nn

    from torchdora.recipes.settings import FinetuneConfig

SAMPLE_PROMPTS = 3  # held-out prompts answered before and after training
SAMPLE_TOKENS = 40


def run_causal_lm(config: FinetuneConfig, output: Path | None, log: Log = print) -> dict[str, Any]:
    """Fine-tune a chat model: ``config.model`` (default: the bundled SmolLM2-135M-Instruct)
    on ``config.data`` (default: the ChatterBot corpus), writing the run folder ``output`` if
    given; returns what ``metrics.json`` holds."""
    conversations = (
        load_chatterbot_corpus() if config.data is None else load_conversations(config.data)
    )
    train_data, test_data = split_conversations(
        conversations, config.test_size, seed=config.split_seed
    )
    set_seed(config.seed)  # the adapters' initial values are part of the run
    model, tokenizer = load_causal_lm(config.model)
    max_length = fitted_max_length(config, model, tokenizer, log)
    train_examples = tokenize_conversations(tokenizer, train_data, max_length)
    test_examples = tokenize_conversations(tokenizer, test_data, max_length)
    # The output head stays in full precision, as in QLoRA: often it is the input embedding.
    quantize_base(model, config, keep=sorted(output_head_names(model)), log=log)
    analysed = adapt_model(model, config, head=None)
    log(
        f"{describe_model(config, model, config.model or SMOLLM2)}; "
        f"{len(train_examples)} train / {len(test_examples)} held-out conversations"
    )

    prompts = list(dict.fromkeys(first_prompt(c) for c in test_data))[:SAMPLE_PROMPTS]
    answers_before = _answers(model, tokenizer, prompts)
    before, summary = train_and_evaluate(
        config,
        model,
        tokenizer,
        train_examples,
        test_examples,
        evaluate=evaluate_causal_lm,
        describe=_loss_line,
        analysed=analysed,
        output=output,
        log=log,
    )
    answers_after = _answers(model, tokenizer, prompts)
    samples = []
    for prompt, old, new in zip(prompts, answers_before, answers_after, strict=True):
        log(f"\n> {prompt}\n  before: {old}\n  after:  {new}")
        samples.append({"prompt": prompt, "before": old, "after": new})
    results = {
        "task": config.task,
        "method": config.method,
        "loss_before": before["eval_loss"],
        "perplexity_before": before["eval_perplexity"],
        "loss_after": summary["eval_loss"],
        "perplexity_after": summary["eval_perplexity"],
        "samples": samples,
        **run_statistics(model, summary),
    }
    if output is not None:
        log("\n" + write_run(output, config, model, tokenizer, results, config.model or SMOLLM2))
    return results


def _loss_line(when: str, metrics: dict[str, float]) -> str:
    loss, perplexity = metrics["eval_loss"], metrics["eval_perplexity"]
    return f"held-out loss {when + ':':<7} {loss:.4f} (perplexity {perplexity:.2f})"


def _answers(model: nn.Module, tokenizer, prompts: list[str]) -> list[str]:
    was_training = model.training
    model.eval()
    try:
        return [generate_reply(model, tokenizer, p, max_new_tokens=SAMPLE_TOKENS) for p in prompts]
    finally:
        model.train(was_training)


CAUSAL_LM = register_task(
    Task(
        name="causal-lm",
        run=run_causal_lm,
        metrics=(
            Metric("loss_before", "loss before", None),
            Metric("loss_after", "loss after", False),
            Metric("perplexity_after", "ppl after", False),
        ),
        # short enough for SmolLM2-135M on the ChatterBot corpus to train in minutes on a CPU
        defaults={"test_size": 0.1, "max_steps": 40, "batch_size": 8, "lr": 2e-3},
    )
)
