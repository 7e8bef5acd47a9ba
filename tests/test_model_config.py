"""DoRAConfig options and target selection, checked on the tiny zoo models; every bad input
gets a clear error; and the whole adapted BERT against PEFT's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model_zoo import SmallCNN, build, example_inputs, output, perturb_adapters
from reference import rel_err
from torchdora import (
    DEFAULT_TARGET_MODULES,
    DoRAConfig,
    DoRAConv,
    DoRAEmbedding,
    DoRALinear,
    ModulesToSaveWrapper,
    apply_dora,
    default_target_modules,
    disable_adapter,
    dora_modules,
    merge_and_unload,
    register_layer_kind,
)
from torchdora.layers import dispatch


def leaf_names(model: nn.Module) -> list[str]:
    return sorted({name.rpartition(".")[2] for name, _ in dora_modules(model)})


# --------------------------------------------------------------------------- target selection
@pytest.mark.parametrize(
    ("name", "expected"),
    [("bert", ["query", "value"]), ("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])],
)
def test_default_targets_per_architecture(name, expected, caplog):
    model = build(name)
    assert default_target_modules(model) == expected
    with caplog.at_level("INFO", logger="torchdora"):
        apply_dora(model)
    assert leaf_names(model) == expected
    assert str(expected) in caplog.text  # says which were chosen
    assert len(list(dora_modules(model))) == 2 * len(expected)  # two layers each


def test_default_targets_table_names_real_modules():
    """Each default entry exists in the architecture transformers builds today."""
    for name, model_type in [("bert", "bert"), ("llama", "llama"), ("gpt2", "gpt2")]:
        model = build(name)
        present = {n.rpartition(".")[2] for n, _ in model.named_modules()}
        assert set(DEFAULT_TARGET_MODULES[model_type]) <= present


def test_all_linear_skips_output_head_and_non_linear_kinds():
    model = build("bert")
    apply_dora(model, DoRAConfig(target_modules="all-linear"))
    names = [n for n, _ in dora_modules(model)]
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attn-out, intermediate, out per layer; pooler
    assert all(isinstance(m, DoRALinear) for _, m in dora_modules(model))
    lm = build("llama")
    apply_dora(lm, DoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in [n for n, _ in dora_modules(lm)]


def test_regex_target_and_exclude_modules():
    model = build("llama")
    apply_dora(
        model, DoRAConfig(target_modules=r".*layers\.0\..*_proj", exclude_modules=["o_proj"])
    )
    names = [n.removeprefix("model.layers.0.") for n, _ in dora_modules(model)]
    assert names == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    regex_excluded = build("llama")
    apply_dora(regex_excluded, DoRAConfig(target_modules="all-linear", exclude_modules=r".*mlp.*"))
    assert leaf_names(regex_excluded) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_every_kind_is_dispatched():
    model = SmallCNN()
    apply_dora(model, DoRAConfig(target_modules=["conv1", "conv3", "fc"], rank=2))
    kinds = {n: type(m) for n, m in dora_modules(model)}
    assert kinds == {"conv1": DoRAConv, "conv3": DoRAConv, "fc": DoRALinear}
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    apply_dora(emb, DoRAConfig(target_modules=["0"], rank=2))
    assert isinstance(emb[0], DoRAEmbedding)


def test_registered_layer_kind_takes_precedence(monkeypatch):
    """A new base kind (as issue 12's quantized Linears) plugs in with one registration."""
    monkeypatch.setattr(dispatch, "_LAYER_KINDS", list(dispatch._LAYER_KINDS))

    calls = []

    def factory(module, **options):
        calls.append(options)
        return DoRALinear.from_linear(module, **options)

    register_layer_kind(
        dispatch.LayerKind("tagged", nn.Linear, factory, True, lambda m: hasattr(m, "tag"))
    )
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].tag = True  # e.g. a Linear whose weight is a quantized tensor
    apply_dora(model, DoRAConfig(target_modules=["0", "1"], rank=2, init="gaussian"))
    assert len(calls) == 1 and calls[0]["rank"] == 2 and calls[0]["init"] == "gaussian"
    assert isinstance(model[1], DoRALinear)  # untagged: the built-in nn.Linear kind


def test_rank_and_alpha_patterns():
    model = build("llama")
    config = DoRAConfig(
        target_modules=["q_proj", "v_proj"],
        rank=4,
        alpha=8.0,
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 6},
        alpha_pattern={"v_proj": 3.0},
    )
    apply_dora(model, config)
    got = {n.removeprefix("model.layers."): (m.rank, m.alpha) for n, m in dora_modules(model)}
    assert got == {
        "0.self_attn.q_proj": (4, 8.0),
        "0.self_attn.v_proj": (6, 3.0),
        "1.self_attn.q_proj": (2, 8.0),
        "1.self_attn.v_proj": (6, 3.0),
    }


# --------------------------------------------------------------------------- training options
def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "all", "dora_only"])
def test_bias_modes(bias):
    model = build("bert")
    apply_dora(model, DoRAConfig(target_modules=["query"], bias=bias))
    biases = {n for n in trainable(model) if n.endswith("bias")}
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    expected = {
        "none": set(),
        "all": all_biases,
        "dora_only": {n for n in all_biases if n.endswith("query.base_layer.bias")},
    }[bias]
    assert biases == expected and (bias == "none" or expected)


def test_magnitude_trainable_false_and_use_dora_false():
    model = build("llama")
    apply_dora(model, DoRAConfig(target_modules=["q_proj"], magnitude_trainable=False))
    assert not any(n.endswith("magnitude") for n in trainable(model))
    assert any(n.endswith("lora_B") for n in trainable(model))
    lora = build("llama")
    apply_dora(lora, DoRAConfig(target_modules=["q_proj"], use_dora=False))
    assert all(m.magnitude is None and not m.use_dora for _, m in dora_modules(lora))


def test_gaussian_init():
    model = build("llama")
    apply_dora(model, DoRAConfig(target_modules=["up_proj"], rank=16, init="gaussian"))
    for _, layer in dora_modules(model):
        assert layer.init == "gaussian" and abs(float(layer.lora_A.detach().std()) - 1 / 16) < 0.01
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_modules_to_save_trains_a_copy_and_unloads_it():
    original = build("bert")
    model = copy.deepcopy(original)
    apply_dora(model, DoRAConfig(target_modules=["query"], modules_to_save=["classifier"]))
    wrapper = model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert {n for n in trainable(model) if "classifier" in n} == {
        "classifier.modules_to_save.default.weight",
        "classifier.modules_to_save.default.bias",
    }
    perturb_adapters(model)
    inputs = example_inputs("bert")
    with torch.no_grad():
        with disable_adapter(model):
            assert torch.equal(output(model, inputs), output(original, inputs))
        expected = output(model, inputs)
        trained_head = wrapper.module_to_save
        merge_and_unload(model)
        assert model.classifier is trained_head
        assert rel_err(output(model, inputs), expected) <= 1e-5


# --------------------------------------------------------------------------- bad input
def test_no_match_lists_close_names():
    with pytest.raises(ValueError, match=r"matches no module.*Did you mean \[.*'q_proj'.*\]\?"):
        apply_dora(build("llama"), DoRAConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match=r"can adapt: \[.*'query'"):
        apply_dora(build("bert"), DoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"regular expression .* pass a list: \['q_proj'\]"):
        apply_dora(build("llama"), DoRAConfig(target_modules="q_proj"))


def test_unsupported_kind_is_named_with_its_type():
    with pytest.raises(TypeError, match=r"'bert\.encoder\.layer\.0\.attention' \(BertAttention\)"):
        apply_dora(build("bert"), DoRAConfig(target_modules=["attention"]))
    with pytest.raises(TypeError, match=r"LayerNorm"):
        apply_dora(build("bert"), DoRAConfig(target_modules=["LayerNorm"]))
    mha = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(TypeError, match=r"'self_attn\.out_proj' .*MultiheadAttention"):
        apply_dora(mha, DoRAConfig(target_modules=["out_proj"]))
    apply_dora(mha, DoRAConfig(target_modules="all-linear"))  # out_proj is skipped
    assert [n for n, _ in dora_modules(mha)] == ["linear1", "linear2"]


def test_applying_twice_is_refused():
    model = build("llama")
    apply_dora(model, DoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        apply_dora(model, DoRAConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        apply_dora(model, DoRAConfig(target_modules="all-linear"))
    apply_dora(model, DoRAConfig(target_modules=["v_proj"]))  # other modules: fine
    assert leaf_names(model) == ["q_proj", "v_proj"]
    assert all(m.lora_A.requires_grad for _, m in dora_modules(model))  # first adapters kept


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"rank_pattern": {"nonexistent": 2}}, "rank_pattern key 'nonexistent'"),
        ({"alpha_pattern": {"k_proj": 2.0}}, "alpha_pattern key 'k_proj'"),
        ({"exclude_modules": ["nothing"]}, "exclude_modules"),
        ({"modules_to_save": ["nothing"]}, "modules_to_save entry 'nothing'"),
        ({"modules_to_save": ["self_attn"]}, "overlaps the DoRA targets"),
    ],
)
def test_options_that_match_nothing_or_clash(config, match):
    with pytest.raises(ValueError, match=match):
        apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"], **config))


def test_rank_larger_than_layer_warns_and_works():
    model = build("bert")
    with pytest.warns(UserWarning, match=r"classifier \(3×32, rank 8\)"):
        apply_dora(model, DoRAConfig(target_modules=["classifier", "query"]))
    perturb_adapters(model)
    assert torch.isfinite(output(model, example_inputs("bert"))).all()


def test_unknown_architecture_needs_target_modules():
    with pytest.raises(ValueError, match=r"target_modules is not set.*'conv1'"):
        apply_dora(SmallCNN())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"bias": "lora_only"}, ValueError, "bias must be one of"),
        ({"init": "pissa"}, ValueError, "init must be one of"),
        ({"target_modules": 5}, TypeError, "target_modules"),
        ({"target_modules": []}, ValueError, "non-empty"),
        ({"target_modules": "(unclosed"}, ValueError, "regular expression"),
        ({"modules_to_save": "classifier"}, TypeError, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 0}}, ValueError, "rank"),
        ({"rank_pattern": ["q_proj"]}, TypeError, "rank_pattern"),
        ({"alpha": "16"}, TypeError, "alpha must be a number, got str"),
        ({"alpha": True}, TypeError, "alpha must be a number, got bool"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a number"),
        ({"eps": None}, TypeError, "eps must be a number"),
        ({"alpha_pattern": {"q_proj": "8"}}, TypeError, "alpha must be a number"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        DoRAConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        apply_dora("model", DoRAConfig())
    with pytest.raises(TypeError, match="DoRAConfig"):
        apply_dora(SmallCNN(), {"rank": 4})


# --------------------------------------------------------------------------- against PEFT
def test_whole_bert_matches_peft():
    """Same adapter tensors in PEFT's DoRA BERT and ours: same logits."""
    peft = pytest.importorskip("peft")
    base = build("bert")
    ours = copy.deepcopy(base)
    apply_dora(ours, DoRAConfig(target_modules=["query", "value", "dense"], rank=4, alpha=8.0))
    perturb_adapters(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=["query", "value", "dense"], use_dora=True
    )
    theirs = peft.get_peft_model(base, config).eval()
    for name, layer in dora_modules(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    inputs = example_inputs("bert")
    with torch.no_grad():
        assert rel_err(output(ours, inputs), output(theirs, inputs)) <= 1e-5
