"""The causal-LM instruction fine-tune behind ``torchdora finetune --task causal-lm``.

:func:`run_causal_lm` trains a DoRA adapter on chat conversations (loss on the assistant's
tokens only), reports held-out loss and perplexity and a few greedy answers to held-out
prompts before and after, and writes the run folder: ``adapter/`` (PEFT format),
``merged/`` (model and tokenizer, loadable by ``transformers`` alone), ``config.json``,
``metrics.json``, ``metrics.jsonl`` and ``decomposition.jsonl`` (ΔM/ΔD per layer at each log
step, for ``torchdora analyze``). With ``quantize`` (QDoRA) every Linear but the output head
is quantized before the adapters are added.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchdora.finetune import (
    FinetuneConfig,
    adapt_model,
    decomposition_callbacks,
    describe_run,
    fitted_max_length,
    quantize_base,
    run_statistics,
    write_run,
)
from torchdora.generate import generate_reply
from torchdora.model import count_trainable_parameters
from torchdora.model.targeting import output_head_names
from torchdora.train import (
    SMOLLM2,
    Trainer,
    evaluate_causal_lm,
    first_prompt,
    load_causal_lm,
    load_chatterbot_corpus,
    load_conversations,
    pad_collate,
    set_seed,
    split_conversations,
    tokenize_conversations,
)

if TYPE_CHECKING:
    from torch import nn

SAMPLE_PROMPTS = 3  # held-out prompts answered before and after training
SAMPLE_TOKENS = 40


def run_causal_lm(
    config: FinetuneConfig, output: Path | None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run ``config`` (``task="causal-lm"``) end to end, writing the run folder ``output`` if
    given (:func:`~torchdora.finetune.run_finetune` prepares it); returns what
    ``metrics.json`` holds. Unusable data or model raise ``ValueError`` subclasses."""
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
    trainable, total = count_trainable_parameters(model)
    log(
        f"{config.describe_method()} on {config.model or SMOLLM2}: "
        f"{trainable:,} trainable of {total:,} parameters; "
        f"{len(train_examples)} train / {len(test_examples)} held-out conversations"
    )

    args = config.training_arguments()
    collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0)
    evaluate = partial(
        evaluate_causal_lm, examples=test_examples, data_collator=collate, precision=args.precision
    )
    prompts = list(dict.fromkeys(first_prompt(c) for c in test_data))[:SAMPLE_PROMPTS]
    answer = partial(_answers, tokenizer=tokenizer, prompts=prompts)
    before = evaluate(model)
    log(_loss_line("before", before))
    answers_before = answer(model)
    trainer = Trainer(
        model,
        args,
        train_examples,
        data_collator=collate,
        eval_fn=evaluate,
        callbacks=decomposition_callbacks(
            model, output, analysed, resuming=config.resume is not None
        ),
    )
    summary = trainer.train(resume_from_checkpoint=config.resume)
    log(
        _loss_line("after ", summary) + f" — {summary['step']} steps, "
        f"{summary['time_per_step_s']:.2f} s/step"
    )
    answers_after = answer(model)
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
        **run_statistics(trainable, total, summary),
    }
    if output is not None:
        adapter = write_run(output, config, model, tokenizer, results, config.model or SMOLLM2)
        log(f"\nwrote {describe_run(output, adapter)}")
    return results


def _loss_line(when: str, metrics: dict[str, float]) -> str:
    return (
        f"held-out loss {when}: {metrics['eval_loss']:.4f} "
        f"(perplexity {metrics['eval_perplexity']:.2f})"
    )


def _answers(model: nn.Module, *, tokenizer, prompts: list[str]) -> list[str]:
    was_training = model.training
    model.eval()
    try:
        return [generate_reply(model, tokenizer, p, max_new_tokens=SAMPLE_TOKENS) for p in prompts]
    finally:
        model.train(was_training)
