"""apply_dora and the model-level operations on real architectures with random weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from model_zoo import MODELS, build, example_inputs, output, perturb_adapters
from reference import rel_err
from torchdora import (
    DoRAConfig,
    DoRALayer,
    ModulesToSaveWrapper,
    apply_dora,
    count_trainable_parameters,
    disable_adapter,
    dora_modules,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    unmerge_adapter,
)

ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")


def adapted(name: str, **overrides) -> tuple[nn.Module, nn.Module, dict]:
    """(original copy, adapted model, inputs) for one zoo model."""
    original = build(name)
    model = copy.deepcopy(original)
    apply_dora(model, DoRAConfig(**{**MODELS[name][1], **overrides}))
    return original, model, example_inputs(name)


def is_adapter_param(name: str) -> bool:
    return name.rpartition(".")[2] in ADAPTER_PARAMS or ".modules_to_save." in name


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_keeps_outputs_and_freezes_all_but_adapters(name):
    original, model, inputs = adapted(name)
    with torch.no_grad():
        assert rel_err(output(model, inputs), output(original, inputs)) <= 1e-6
    layers = dict(dora_modules(model))
    assert layers and all(isinstance(m, DoRALayer) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    expected = sum(
        p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad
    )
    expected += sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, ModulesToSaveWrapper)
        for p in m.module_to_save.parameters()
    )
    trained, total = count_trainable_parameters(model)
    assert trained == expected
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_one_optimizer_step_changes_only_adapters(name):
    _, model, inputs = adapted(name)
    perturb_adapters(model)  # B ≠ 0, so A gets a gradient too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output(model, inputs).square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_adapter_param(k) for k in changed)
    assert {k for k in before if k.endswith(("lora_A", "lora_B", "magnitude"))} <= changed


@pytest.mark.parametrize("name", list(MODELS))
def test_merge_and_unload_reproduces_adapted_outputs(name):
    original, model, inputs = adapted(name)
    if name == "gpt2":  # the tied wte cannot be merged (see the tied-embedding test)
        model = adapted(name, target_modules=["c_attn", "c_proj", "c_fc"])[1]
    perturb_adapters(model)
    with torch.no_grad():
        expected = output(model, inputs)
        assert rel_err(expected, output(original, inputs)) > 1e-3
        plain = merge_and_unload(model)
        assert plain is model
        assert not any(
            isinstance(m, DoRALayer | ModulesToSaveWrapper)
            or type(m).__module__.startswith("torchdora")
            for m in plain.modules()
        )
        assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
        assert set(plain.state_dict()) == set(original.state_dict())
        assert rel_err(output(plain, inputs), expected) <= 1e-5


@pytest.mark.parametrize("name", ["bert", "cnn", "vit"])
def test_merge_unmerge_adapter_round_trip(name):
    _, model, inputs = adapted(name)
    perturb_adapters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = output(model, inputs)
        merge_adapter(model)
        assert all(layer.merged for _, layer in dora_modules(model))
        assert rel_err(output(model, inputs), expected) <= 1e-5
        unmerge_adapter(model)
        assert not any(layer.merged for _, layer in dora_modules(model))
        for key, value in model.state_dict().items():
            assert rel_err(value, weights[key]) <= 1e-5, key
        assert rel_err(output(model, inputs), expected) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_disable_adapter_gives_base_outputs_exactly(name):
    original, model, inputs = adapted(name)
    perturb_adapters(model)
    with torch.no_grad():
        adapted_out = output(model, inputs)
        with disable_adapter(model) as same:
            assert same is model
            assert torch.equal(output(model, inputs), output(original, inputs))
        assert torch.equal(output(model, inputs), adapted_out)


def test_disable_adapter_refuses_merged_model_and_restores_state():
    model = adapted("bert")[1]
    layer = next(layer for _, layer in dora_modules(model))
    layer.disabled = True  # a layer the user disabled by hand stays disabled afterwards
    with disable_adapter(model):
        assert all(m.disabled for _, m in dora_modules(model))
    assert layer.disabled and sum(m.disabled for _, m in dora_modules(model)) == 1
    layer.disabled = False
    merge_adapter(model)
    with pytest.raises(RuntimeError, match="unmerge_adapter"), disable_adapter(model):
        pass
    with pytest.raises(ValueError, match="no torchdora adapters"), disable_adapter(build("cnn")):
        pass


def test_train_eval_state_dict_round_trip():
    _, model, inputs = adapted("bert")
    perturb_adapters(model)
    model.train()
    assert all(layer.training for _, layer in dora_modules(model))
    model.eval()
    assert not any(layer.training for _, layer in dora_modules(model))
    state = model.state_dict()
    name = "bert.encoder.layer.0.attention.self.query"
    keys = [f"adapters.default.{p}" for p in ADAPTER_PARAMS] + ["base_layer.weight"]
    assert {f"{name}.{key}" for key in keys} <= set(state)
    _, fresh, _ = adapted("bert")
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(output(fresh, inputs), output(model, inputs))


def test_to_dtype_moves_adapters_and_keeps_outputs():
    _, model, inputs = adapted("llama")
    perturb_adapters(model)
    with torch.no_grad():
        expected = output(model, inputs).double()
        model.to(torch.float64)
        layer = next(layer for _, layer in dora_modules(model))
        assert layer.lora_A.dtype == layer.magnitude.dtype == torch.float64
        assert rel_err(output(model, inputs), expected) <= 1e-5
        model.to(torch.bfloat16)
        assert rel_err(output(model, inputs), expected) <= 5e-2


@pytest.mark.parametrize("name", ["cnn", pytest.param("llama", marks=pytest.mark.slow)])
def test_torch_compile_smoke(name):
    _, model, inputs = adapted(name)
    perturb_adapters(model)
    expected = output(model, inputs)
    compiled = torch.compile(model, backend="aot_eager")
    got = output(compiled, inputs)
    assert rel_err(got, expected) <= 1e-5
    got.square().mean().backward()
    assert all(layer.lora_A.grad is not None for _, layer in dora_modules(model))


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model, inputs = adapted("llama")
    perturb_adapters(model)
    model.train()

    def grads():
        model.zero_grad()
        output(model, inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames the method
        model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    for name, grad in plain.items():
        assert rel_err(checkpointed[name], grad) <= 1e-6, name


def test_tied_embeddings_stay_tied_and_tied_merge_is_refused():
    original, model, inputs = adapted("llama-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # all-linear left lm_head
    assert not any("lm_head" in n or "embed_tokens" in n for n, _ in dora_modules(model))

    tied = copy.deepcopy(original)
    apply_dora(tied, DoRAConfig(target_modules=["embed_tokens", "q_proj"]))
    perturb_adapters(tied)
    with torch.no_grad():
        out = output(tied, inputs)  # the adapted embedding feeds the model; lm_head reads E
        with pytest.raises(ValueError, match=r"lm_head\.weight"):
            merge_and_unload(tied)
        assert not any(layer.merged for _, layer in dora_modules(tied))
        assert torch.equal(output(tied, inputs), out)


def test_gpt2_uses_conv1d_kind_and_embedding_kind():
    _, model, _ = adapted("gpt2")
    kinds = {n.rpartition(".")[2]: type(m).__name__ for n, m in dora_modules(model)}
    assert kinds["c_attn"] == "DoRAConv1D" and kinds["wte"] == "DoRAEmbedding"


def test_print_trainable_parameters(capsys):
    _, model, _ = adapted("cnn")
    trainable, total = count_trainable_parameters(model)
    print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
