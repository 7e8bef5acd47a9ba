"""``mixed_batch``: every row computed by its own adapter equals that row run alone with it.

References: per layer kind, the float64 naive formula for each row group (forward) and the
layer run on the group's rows alone (gradients, which the single-adapter tests check against
float64); for whole models, each row run alone with its adapter active (or the adapters off).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layer_kinds import naive_conv, naive_embedding, reference
from model_zoo import build, example_inputs, output
from reference import naive_dora_linear, rel_err
from torchdora import (
    DoRAConfig,
    DoRAConv,
    DoRAConv1D,
    DoRAEmbedding,
    DoRALinear,
    QuantizedDoRALinear,
    apply_dora,
    disable_adapter,
    dora_modules,
    merge_adapter,
    mixed_batch,
    set_adapter,
    unmerge_adapter,
)

NAMES = ["second", None, "default", "second", "lora"]


def naive_linear(x, W, b, A, B, m, s, eps, detach_norm):
    if m is None:
        return x @ (W + s * (B @ A)).T + (0 if b is None else b)
    return naive_dora_linear(x, W, b, A, B, m, s, eps, detach_norm)


def naive_conv1d(use_dora: bool):
    def naive(x, W, b, A, B, m, s, eps, detach_norm):  # W is Conv1D's stored Wᵀ
        return naive_linear(x, W.T, b, A, B, m, s, eps, detach_norm)

    return naive


def with_adapters(layer):
    """``layer`` (adapter "default") plus a DoRA and a LoRA adapter, all random and trainable."""
    layer.add_adapter("second", rank=3, alpha=5.0)
    layer.add_adapter("lora", rank=2, use_dora=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.lora_A.normal_(std=0.5)
            adapter.lora_B.normal_(std=0.5)
            if adapter.magnitude is not None:
                adapter.magnitude.uniform_(0.5, 2.0)
    return layer


def conv1d_layer():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(7, 6)
    return DoRAConv1D(conv1d.double(), rank=4)


def quantized_layer():
    pytest.importorskip("bitsandbytes")
    from torchdora.quantization import quantize_linear

    return QuantizedDoRALinear(quantize_linear(nn.Linear(6, 7), "bnb-nf4"), rank=4)


def conv2d_layer():
    return DoRAConv(nn.Conv2d(3, 4, 3, padding=1).double(), rank=4)


def embedding_layer():
    return DoRAEmbedding(nn.Embedding(11, 6).double(), rank=4)


#: kind: (layer, naive reference for use_dora True/False, input)
KINDS = {
    "linear": (
        lambda: DoRALinear(6, 7, rank=4, dtype=torch.float64),
        lambda use_dora: naive_linear,
        lambda: torch.randn(5, 3, 6, dtype=torch.float64),
    ),
    "conv2d": (
        conv2d_layer,
        lambda use_dora: naive_conv(nn.Conv2d(3, 4, 3, padding=1), use_dora),
        lambda: torch.randn(5, 3, 6, 6, dtype=torch.float64),
    ),
    "embedding": (
        embedding_layer,
        lambda use_dora: naive_embedding(nn.Embedding(11, 6), use_dora),
        lambda: torch.randint(0, 11, (5, 4)),
    ),
    "conv1d": (conv1d_layer, naive_conv1d, lambda: torch.randn(5, 2, 6, dtype=torch.float64)),
}


def group_rows(names):
    return {n: [i for i, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}


def naive_rows(layer, x, naive, name):
    if name is None:
        with disable_adapter(layer):
            return layer(x).detach()
    layer.active_adapter = name
    out, _ = reference(layer, x, naive(layer.use_dora))
    layer.active_adapter = "default"
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("train", [False, True])
def test_each_row_equals_the_naive_formula_for_its_adapter(kind, train):
    build_layer, naive, make_x = KINDS[kind]
    layer = with_adapters(build_layer()).train(train)
    x = make_x()
    with torch.set_grad_enabled(train), mixed_batch(layer, NAMES):
        out = layer(x)
    for name, rows in group_rows(NAMES).items():
        expected = naive_rows(layer, x[rows], naive, name)
        assert rel_err(out[rows], expected) <= 1e-10, name


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_adapter_gets_the_gradient_of_its_own_rows(kind):
    build_layer, _, make_x = KINDS[kind]
    layer = with_adapters(build_layer()).train()
    x = make_x()
    with mixed_batch(layer, NAMES):
        out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got = {
        n: {k: p.grad.clone() for k, p in a.named_factors().items()}
        for n, a in layer.adapters.items()
    }
    layer.zero_grad()
    for name, rows in group_rows(NAMES).items():
        if name is None:
            continue
        layer.active_adapter = name
        layer(x[rows]).backward(grad_out[rows])
        for param, value in layer.get_adapter(name).named_factors().items():
            assert rel_err(got[name][param], value.grad) <= 1e-10, (name, param)
    layer.active_adapter = "default"


def test_quantized_base():
    layer = with_adapters(quantized_layer()).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        with mixed_batch(layer, NAMES):
            out = layer(x)
        for name, rows in group_rows(NAMES).items():
            if name is None:
                with disable_adapter(layer):
                    expected = layer(x[rows])
            else:
                layer.active_adapter = name
                expected = layer(x[rows])
            assert rel_err(out[rows], expected) <= 1e-6, name


def two_adapter_model(name: str):
    config = {"target_modules": "all-linear"}
    if name == "bert":
        config["modules_to_save"] = ["classifier"]
    model = apply_dora(build(name), DoRAConfig(**config))
    for module in model.modules():  # train mode is compared row by row: no random dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    apply_dora(model, DoRAConfig(**{**config, "rank": 2}), adapter_name="second")
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in dora_modules(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(std=0.2)
                adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
        for module in model.modules():
            if hasattr(module, "modules_to_save"):
                for copy in module.modules_to_save.values():
                    copy.weight.add_(torch.randn_like(copy.weight), alpha=0.3)
    return model


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("train", [False, True])
def test_whole_model_rows_equal_single_adapter_runs(name, train):
    model = two_adapter_model(name).train(train)
    names = ["second", None, "default", "second"]
    inputs = example_inputs(name, batch=len(names))
    with torch.set_grad_enabled(train), mixed_batch(model, names):
        out = output(model, inputs)
    with torch.no_grad():
        for i, adapter in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if adapter is None:
                with disable_adapter(model):
                    expected = output(model, row)
            else:
                set_adapter(model, adapter)
                expected = output(model, row)
            assert rel_err(out[i : i + 1], expected) <= 1e-5, (i, adapter)


def test_generate_with_a_kv_cache_serves_each_row_its_adapter():
    model = two_adapter_model("llama").eval()
    names = ["second", None, "default"]
    ids = torch.randint(0, 64, (3, 5))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with mixed_batch(model, names):
            generated = model.generate(input_ids=ids, **settings)
        for i, adapter in enumerate(names):
            if adapter is None:
                with disable_adapter(model):
                    alone = model.generate(input_ids=ids[i : i + 1], **settings)
            else:
                set_adapter(model, adapter)
                alone = model.generate(input_ids=ids[i : i + 1], **settings)
            assert torch.equal(generated[i : i + 1], alone), adapter


def test_refusals():
    model = two_adapter_model("llama").eval()
    inputs = example_inputs("llama", batch=2)
    with (
        pytest.raises(ValueError, match="should be the batch of 3 rows"),
        mixed_batch(model, ["default"] * 3),
    ):
        output(model, inputs)
    unknown = r"no adapter named 'third'.*\['default', 'second'\]"
    with pytest.raises(KeyError, match=unknown), mixed_batch(model, ["default", "third"]):
        pass
    with pytest.raises(TypeError, match="one adapter name"), mixed_batch(model, "default"):
        pass
    merge_adapter(model)
    with pytest.raises(RuntimeError, match="unmerge"), mixed_batch(model, ["default", None]):
        pass
    unmerge_adapter(model)
    with mixed_batch(model, ["default", None]):
        pass
    assert all(layer.row_adapters is None for _, layer in dora_modules(model))
