"""Deferred initialisation: models adapted on the meta device equal the eagerly built ones once
their weights are loaded, and a forward on an adapter with no values is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model_zoo import MODELS, SmallCNN, build, example_inputs, output, perturb_adapters
from reference import naive_dora_weight, rel_err
from torchdora import (
    DoRAConfig,
    DoRALinear,
    adapted_state_dict,
    apply_dora,
    dora_modules,
    initialize_magnitude,
)
from torchdora.io import load_adapter, save_adapter

ADAPTER_SEED = 1


def eager_and_meta(name: str) -> tuple[nn.Module, nn.Module, dict]:
    """(model adapted on real weights, the same model adapted on ``meta`` then materialised and
    given the base weights, the base state dict)."""
    base = build(name)
    eager = copy.deepcopy(base)
    torch.manual_seed(ADAPTER_SEED)
    apply_dora(eager, DoRAConfig(**MODELS[name][1]))
    with torch.device("meta"):
        meta = MODELS[name][0]().eval()
    apply_dora(meta, DoRAConfig(**MODELS[name][1]))
    meta.to_empty(device="cpu")
    result = meta.load_state_dict(adapted_state_dict(meta, base.state_dict()), strict=False)
    assert not result.unexpected_keys
    assert all(
        k.rpartition(".")[2] in ("lora_A", "lora_B", "magnitude") for k in result.missing_keys
    )
    # Non-persistent buffers (rotary frequencies, position ids) are the model's own business.
    buffers = dict(eager.named_buffers())
    with torch.no_grad():
        for key, buffer in meta.named_buffers():
            buffer.copy_(buffers[key])
    return eager, meta, base.state_dict()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_init_equals_eager_init(name):
    eager, meta, _ = eager_and_meta(name)
    assert all(not layer.adapter_initialized for _, layer in dora_modules(meta))
    inputs = example_inputs(name)
    with pytest.raises(RuntimeError, match="initialize_magnitude"):
        output(meta, inputs)
    torch.manual_seed(ADAPTER_SEED)  # A is drawn now, in the order apply_dora drew it
    assert initialize_magnitude(meta) is meta
    assert all(layer.adapter_initialized for _, layer in dora_modules(meta))
    assert_same_state(meta, eager)
    with torch.no_grad():
        assert torch.equal(output(meta, inputs), output(eager, inputs))
    output(meta, inputs).square().mean().backward()  # the training path runs too


def test_uninitialised_forward_is_refused_with_and_without_grad():
    with torch.device("meta"):
        layer = DoRALinear(6, 5, rank=2)
    layer.to_empty(device="cpu")
    nn.init.normal_(layer.base_layer.weight)
    x = torch.randn(3, 6)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="meta device"):
            layer(x)
    with pytest.raises(RuntimeError, match="meta device"):
        layer.merge()


def test_load_state_dict_assign_materialises_adapters_on_initialize():
    torch.manual_seed(0)
    base = SmallCNN()
    eager = copy.deepcopy(base)
    config = DoRAConfig(**MODELS["cnn"][1])
    torch.manual_seed(ADAPTER_SEED)
    apply_dora(eager, config)
    with torch.device("meta"):
        meta = apply_dora(SmallCNN(), config)
    meta.load_state_dict(adapted_state_dict(meta, base.state_dict()), strict=False, assign=True)
    torch.manual_seed(ADAPTER_SEED)
    initialize_magnitude(meta)
    assert not any(p.is_meta for p in meta.parameters())
    assert {n for n, p in meta.named_parameters() if p.requires_grad} == {
        n for n, p in eager.named_parameters() if p.requires_grad
    }
    assert_same_state(meta, eager)


def test_loading_a_trained_adapter_initialises_meta_built_layers(tmp_path):
    eager, meta, _ = eager_and_meta("llama")
    perturb_adapters(eager)
    save_adapter(eager, tmp_path)
    load_adapter(meta, tmp_path)
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(meta, inputs), output(eager, inputs))


def test_load_state_dict_with_adapter_keys_initialises_meta_built_layers():
    eager, meta, _ = eager_and_meta("bert")
    perturb_adapters(eager)
    meta.load_state_dict(eager.state_dict())
    assert all(layer.adapter_initialized for _, layer in dora_modules(meta))
    inputs = example_inputs("bert")
    with torch.no_grad():
        assert torch.equal(output(meta, inputs), output(eager, inputs))


def test_initialize_magnitude_of_trained_factors_gives_loras_output():
    """With A, B kept, m = ‖W + sBA‖ makes the DoRA layer compute what LoRA computes."""
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "down_proj"]))
    perturb_adapters(model)
    layers = dict(dora_modules(model))
    factors = {n: (layer.lora_A.clone(), layer.lora_B.clone()) for n, layer in layers.items()}
    initialize_magnitude(model)
    for name, layer in layers.items():
        A, B = factors[name]
        assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
        W, s = layer.weight.double(), layer.scaling
        expected = torch.linalg.vector_norm(W + s * (B.double() @ A.double()), dim=1)
        assert rel_err(layer.magnitude, expected) <= 1e-6
        lora_weight = W + s * (B.double() @ A.double())
        dora_weight = naive_dora_weight(
            W, A.double(), B.double(), layer.magnitude.double(), s, layer.eps
        )
        assert rel_err(dora_weight, lora_weight) <= 1e-6


def test_initialize_magnitude_errors():
    with pytest.raises(ValueError, match="apply_dora first"):
        initialize_magnitude(build("cnn"))
    with torch.device("meta"):
        meta = apply_dora(SmallCNN(), DoRAConfig(target_modules=["fc"], rank=4))
    with pytest.raises(RuntimeError, match="to_empty"):
        initialize_magnitude(meta)
    model = apply_dora(build("cnn"), DoRAConfig(target_modules=["fc"], rank=4))
    model.fc.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        initialize_magnitude(model)


def test_adapted_state_dict_renames_only_moved_modules():
    base = build("bert")
    model = apply_dora(copy.deepcopy(base), DoRAConfig(**MODELS["bert"][1]))
    state = base.state_dict()
    renamed = adapted_state_dict(model, state)
    q = "bert.encoder.layer.0.attention.self.query"
    assert renamed[f"{q}.base_layer.weight"] is state[f"{q}.weight"]
    assert f"{q}.weight" not in renamed
    head = state["classifier.weight"]
    assert renamed["classifier.original_module.weight"] is head
    assert renamed["classifier.modules_to_save.default.weight"] is head
    key = "bert.embeddings.word_embeddings.weight"
    assert renamed[key] is state[key]
    assert set(renamed) <= set(model.state_dict())
    # Keys already in the adapted model's form pass through unchanged.
    assert adapted_state_dict(model, renamed).keys() == renamed.keys()
