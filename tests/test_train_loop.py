"""The Trainer on a tiny DoRA classifier: accumulation, clipping, resume, checkpoints, logs."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchdora import DoRAConfig, DoRALinear, apply_dora
from torchdora.train import (
    CheckpointError,
    ProgressReporter,
    Trainer,
    TrainingArguments,
    autocast,
    evaluate_classification,
    load_checkpoint,
    pad_collate,
    set_seed,
)
from torchdora.train.precision import resolve_precision

VOCAB, NUM_LABELS = 40, 3


class TinyClassifier(nn.Module):
    """Frozen embedding, masked mean pool, a DoRA layer (with dropout), a trained head.

    Called like a ``transformers`` model: keyword tensors in, ``.loss``/``.logits`` out.
    """

    def __init__(self, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 12, dtype=dtype).requires_grad_(False)
        hidden = nn.Linear(12, 12, dtype=dtype).requires_grad_(False)
        self.hidden = DoRALinear.from_linear(hidden, rank=4, dropout=dropout)
        self.classifier = nn.Linear(12, NUM_LABELS, dtype=dtype)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        logits = self.classifier(torch.tanh(self.hidden(pooled)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def make_examples(n: int, seed: int = 1) -> list[dict]:
    """Token lists of varied length; the label is a function of the tokens, so it is learnable."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        examples.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": ids[0] % NUM_LABELS}
        )
    return examples


def make_model(dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> TinyClassifier:
    set_seed(0)
    model = TinyClassifier(dropout, dtype)
    with torch.no_grad():  # move B off zero so every parameter gets a gradient at step 1
        model.hidden.lora_B.normal_(std=0.1)
    return model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def quiet_args(**kwargs) -> TrainingArguments:
    return TrainingArguments(**{"progress": "none", "device": "cpu", **kwargs})


def reference_grads(model: nn.Module, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss over one big batch of ``examples``, on a copy of the model."""
    model = copy.deepcopy(model)
    model(**pad_collate(examples)).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("micro_sizes", [(4, 4, 2), (5, 5), (1,) * 10])
def test_accumulated_gradients_equal_one_big_batch(micro_sizes):
    model = make_model(dtype=torch.float64)
    examples = make_examples(10)
    expected = reference_grads(model, examples)
    trainer = Trainer(model, quiet_args(), examples)
    bounds = torch.tensor((0, *micro_sizes)).cumsum(0).tolist()
    micro = [pad_collate(examples[a:b]) for a, b in itertools.pairwise(bounds)]
    trainer.accumulate_gradients(micro)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-12, atol=1e-14)


def test_accumulated_gradients_of_a_causal_lm_equal_one_big_batch():
    """A causal LM averages its loss over ``labels[:, 1:]`` (it shifts them): accumulation
    must weigh micro-batches of rows of other lengths by that count, not by all labels."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    set_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    apply_dora(model, DoRAConfig(target_modules=["q_proj", "v_proj"], rank=2))
    g = torch.Generator().manual_seed(0)
    examples = []
    for length in (2, 2, 12, 12, 3, 9):
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    expected = reference_grads(model, examples)
    trainer = Trainer(model, quiet_args(), examples)
    trainer.accumulate_gradients([pad_collate(examples[i : i + 2]) for i in (0, 2, 4)])
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-9)


def test_trainer_accumulation_steps_equal_big_batch_steps():
    """bs 4 × 3 accumulation vs bs 12 over 12 examples: the same SGD trajectory."""
    examples = make_examples(12)
    finals = []
    for batch_size, accumulation in ((12, 1), (4, 3)):
        model = make_model(dtype=torch.float64)
        args = quiet_args(
            train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=4,
            max_grad_norm=None,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
        )
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        Trainer(model, args, examples, optimizer=optimizer).train()
        finals.append(trainable(model))
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("max_norm", [None, 1e-3, 1e6])
def test_gradient_clipping(max_norm):
    """One SGD step with lr 1 moves the parameters by minus the clipped gradient (torch adds
    1e-6 to the norm it divides by, hence rtol 1e-5 when clipping)."""
    model = make_model(dtype=torch.float64)
    examples = make_examples(8)
    grads = reference_grads(model, examples)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    before = trainable(model)
    records = []
    args = quiet_args(
        train_batch_size=8,
        max_steps=1,
        max_grad_norm=max_norm,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        logging_steps=1,
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    Trainer(model, args, examples, optimizer=optimizer, callbacks=[records.append]).train()
    scale = 1.0 if max_norm is None else min(1.0, max_norm / float(norm))
    after = trainable(model)
    for name in before:
        torch.testing.assert_close(
            after[name], before[name] - scale * grads[name], rtol=1e-5, atol=1e-12
        )
    assert records[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-9)


# --------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def resume_run_args(checkpoint_dir, **kwargs) -> TrainingArguments:
    settings = {
        "train_batch_size": 4,
        "gradient_accumulation_steps": 2,  # 22 examples: 6 micro-batches, 3 steps an epoch
        "max_steps": 10,
        "learning_rate": 5e-2,
        "warmup_ratio": 0.2,
        "logging_steps": 1,
        "checkpoint_dir": str(checkpoint_dir),
        "seed": 3,
    }
    return quiet_args(**{**settings, **kwargs})


def test_resume_equals_uninterrupted_run(tmp_path):
    check_resume_equals_uninterrupted_run(tmp_path)


def rng_draws(device: str) -> list[torch.Tensor]:
    """Draws from the CPU generator and from ``device``'s."""
    draws = [torch.rand(3)]
    if device != "cpu":
        draws.append(torch.rand(3, device=device))
    return draws


def check_resume_equals_uninterrupted_run(tmp_path, device: str = "cpu", **kwargs) -> None:
    """Interrupted at step 5 (checkpoint at 4), resumed in a fresh model: bitwise the same
    parameters, optimizer state and RNG streams as a run that never stopped. Dropout is on, so
    the RNG state matters. ``kwargs`` are further training arguments (e.g. the precision)."""
    examples = make_examples(22)
    settings = {"device": device, **kwargs}

    model = make_model(dropout=0.2)
    trainer = Trainer(model, resume_run_args(tmp_path / "straight", **settings), examples)
    trainer.train()
    straight, straight_opt = trainable(model), trainer.optimizer.state_dict()
    straight_rng = rng_draws(device)

    def stop_at_5(record):
        if record["step"] == 5:
            raise Interrupt

    model = make_model(dropout=0.2)
    args = resume_run_args(tmp_path / "ckpt", save_steps=4, **settings)
    with pytest.raises(Interrupt):
        Trainer(model, args, examples, callbacks=[stop_at_5]).train()
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["step"] == 4

    torch.manual_seed(1234)  # a new process: whatever the RNG was, the checkpoint restores it
    if device != "cpu":
        torch.cuda.manual_seed_all(1234)
    model = make_model(dropout=0.2)
    resumed = Trainer(model, args, examples)
    summary = resumed.train(resume_from_checkpoint=tmp_path / "ckpt")
    assert summary["step"] == 10
    for name, value in straight.items():
        assert torch.equal(trainable(model)[name], value), name
    resumed_opt = resumed.optimizer.state_dict()
    for index, state in straight_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_opt["state"][index][key], value), (index, key)
    for draw, straight_draw in zip(rng_draws(device), straight_rng, strict=True):
        assert torch.equal(draw, straight_draw)


def test_resume_refuses_other_settings(tmp_path):
    examples = make_examples(22)
    Trainer(make_model(), resume_run_args(tmp_path / "c", max_steps=2), examples).train()
    for change in ({"max_steps": 3}, {"seed": 4}):
        args = resume_run_args(tmp_path / "c", **{"max_steps": 2, **change})
        with pytest.raises(CheckpointError, match="saved by a run with other settings"):
            Trainer(make_model(), args, examples).train(resume_from_checkpoint=tmp_path / "c")
    # a checkpoint of a 2-process (DDP) run: another global batch, so another run
    state_file = tmp_path / "c" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    args = resume_run_args(tmp_path / "c", max_steps=2)
    with pytest.raises(CheckpointError, match="world_size 2 -> 1"):
        Trainer(make_model(), args, examples).train(resume_from_checkpoint=tmp_path / "c")


def test_checkpoint_mismatch_and_incomplete(tmp_path):
    examples = make_examples(8)
    model = make_model()
    Trainer(model, quiet_args(max_steps=1, checkpoint_dir=str(tmp_path / "c")), examples).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging folder left

    other = make_model()
    other.classifier.requires_grad_(False)  # different trainable set
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "c", other)
    wide = make_model()
    wide.classifier = nn.Linear(12, 5)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "c", wide)
    (tmp_path / "c" / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "c", make_model())


# --------------------------------------------------------------------------- logs, eval
def test_logs_metrics_and_evaluation(tmp_path, capsys):
    examples = make_examples(48)
    model = make_model()
    metrics = tmp_path / "metrics.jsonl"

    def eval_fn(m):
        return evaluate_classification(m, examples, batch_size=7)

    before = eval_fn(model)
    args = quiet_args(
        train_batch_size=8,
        num_train_epochs=12,
        learning_rate=5e-2,
        logging_steps=10,
        eval_steps=30,
        metrics_file=str(metrics),
        progress="log",
    )
    summary = Trainer(model, args, examples, eval_fn=eval_fn).train()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60, 70, 72]
    assert [r["step"] for r in eval_rows] == [30, 60, 72]
    assert {"lr", "grad_norm", "tokens_per_s", "epoch"} <= set(train_rows[0])
    assert summary["eval_accuracy"] == eval_rows[-1]["eval_accuracy"]
    assert summary["eval_loss"] < before["eval_loss"]
    assert summary["eval_accuracy"] > before["eval_accuracy"]
    err = capsys.readouterr().err
    assert "step 10/72 | epoch" in err and "| loss " in err and "eval_accuracy" in err


def test_logged_loss_is_the_mean_of_the_steps_since_the_last_record():
    step_losses = []

    def recording_loss(model, batch):
        loss = model(**batch).loss
        step_losses.append(loss.item())
        return loss

    records = []
    args = quiet_args(train_batch_size=4, max_steps=7, logging_steps=3, learning_rate=1e-2)
    Trainer(
        make_model(),
        args,
        make_examples(40),
        compute_loss=recording_loss,
        callbacks=[records.append],
    ).train()
    assert [r["step"] for r in records] == [3, 6, 7]
    windows = [step_losses[0:3], step_losses[3:6], step_losses[6:7]]
    for record, window in zip(records, windows, strict=True):
        assert record["loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)


class FloatReads(TorchDispatchMode):
    """Counts reads of a floating-point tensor's value into Python (``.item()``, ``float()``):
    on a GPU each one waits for the device to finish its queued work."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_floating_point():
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_steps_do_not_wait_for_the_device_between_log_records():
    def float_reads(steps: int) -> int:
        model = make_model()
        args = quiet_args(train_batch_size=4, max_steps=steps, logging_steps=steps)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        trainer = Trainer(model, args, make_examples(80), optimizer=sgd)
        with FloatReads() as reads:
            trainer.train()
        return reads.count

    assert float_reads(12) == float_reads(2)  # one log record each


def test_evaluate_classification_against_direct_computation():
    model = make_model()
    examples = make_examples(13)
    model.train()
    metrics = evaluate_classification(model, examples, batch_size=4)
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        batch = pad_collate(examples)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected_loss = nn.functional.cross_entropy(logits, batch["labels"]).item()
    expected_acc = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(expected_acc)


# --------------------------------------------------------------------------- precision
def test_resolve_precision():
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16 training needs a CUDA device"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocast_on_cpu_trains():
    x = torch.randn(4, 8)
    with autocast("bf16", "cpu"):
        assert nn.functional.linear(x, torch.randn(3, 8)).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert nn.functional.linear(x, torch.randn(3, 8)).dtype == torch.float32
    model = make_model()
    records = []
    args = quiet_args(precision="bf16", max_steps=3, logging_steps=1, train_batch_size=8)
    Trainer(model, args, make_examples(24), callbacks=[records.append]).train()
    assert all(math.isfinite(r["loss"]) for r in records)
    assert model.hidden.magnitude.dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp16"}, "fp16 training needs a CUDA device"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"train_batch_size": 0}, "train_batch_size must be a positive integer"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(make_model(), quiet_args(**kwargs), make_examples(4))


def test_argument_of_a_wrong_type_is_named():
    with pytest.raises(TypeError, match="learning_rate must be float, got '1e-3'"):
        quiet_args(learning_rate="1e-3")


def test_examples_as_tensors_train_like_lists():
    """What a typical torch ``Dataset`` returns: tensors, the label a 0-d one."""
    examples = make_examples(8)
    as_tensors = [{k: torch.tensor(v) for k, v in ex.items()} for ex in examples]
    finals = []
    for data in (examples, as_tensors):
        model = make_model()
        Trainer(model, quiet_args(train_batch_size=4, max_steps=2), data).train()
        finals.append(trainable(model))
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ex: ex.pop("labels"), "compute_loss returned None.*need 'labels'"),
        (lambda ex: ex.update(labels="pos"), "'labels' must be numbers.*got 'pos'"),
        (lambda ex: ex.update(labels=-100), "step 1 has no item to learn from"),
    ],
)
def test_unusable_examples_are_named(edit, message):
    examples = make_examples(4)
    for example in examples:
        edit(example)
    with pytest.raises(ValueError, match=message):
        Trainer(make_model(), quiet_args(train_batch_size=4, max_steps=1), examples).train()


def test_training_goes_on_in_train_mode_after_an_eval_fn_that_set_eval():
    model = make_model(dropout=0.5)
    modes = []
    model.hidden.register_forward_hook(lambda module, args, out: modes.append(module.training))

    def eval_fn(m):
        m.eval()
        return {"eval_x": 1.0}

    args = quiet_args(train_batch_size=4, max_steps=3, eval_steps=1)
    Trainer(model, args, make_examples(8), eval_fn=eval_fn).train()
    assert modes == [True, True, True]


def test_progress_bar_and_plain_lines():
    bar_stream, line_stream = io.StringIO(), io.StringIO()
    bar = ProgressReporter(4, mode="bar", stream=bar_stream)
    lines = ProgressReporter(4, mode="auto", stream=line_stream)  # not a terminal: lines
    for reporter in (bar, lines):
        reporter.update(2)
        reporter.log({"step": 2, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 900.0})
        reporter.log({"step": 2, "eval_accuracy": 0.75})
        reporter.close()
    shown = bar_stream.getvalue()
    assert "2/4" in shown and "loss=0.5" in shown and "eval_accuracy 0.75" in shown
    assert line_stream.getvalue().splitlines() == [
        "step 2/4 | loss 0.5 | lr 1.00e-03 | tokens_per_s 900",
        "step 2/4 | eval_accuracy 0.75",
    ]
