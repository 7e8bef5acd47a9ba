"""Several named adapters on one model: adding, switching, deleting, merging, files both ways
with the real PEFT, and a weighted combination that is right for DoRA.

The reference for "adapter X active" is a model adapted with X alone (same values), whose
single-adapter layers the other test files check against the float64 naive formula; for the
combination, the naive formula itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model_zoo import build, example_inputs, output
from reference import naive_dora_weight, rel_err
from torchdora import (
    DoRAConfig,
    DoRALayer,
    active_adapter,
    adapter_names,
    apply_dora,
    combine_adapters,
    delete_adapter,
    disable_adapter,
    dora_modules,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    unmerge_adapter,
)
from torchdora.io import load_adapter, save_adapter

peft = pytest.importorskip("peft")

DEFAULT = DoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, alpha=8.0)
SECOND = DoRAConfig(target_modules=["q_proj", "o_proj"], rank=2, alpha=3.0, dropout=0.1)
LORA = DoRAConfig(target_modules=["v_proj"], rank=3, use_dora=False)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Every adapter of every layer away from its initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dora_modules(model):
            for adapter in layer.adapters.values():
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=gen) * 0.3)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.3)
                if adapter.magnitude is not None:
                    adapter.magnitude.mul_(torch.rand(adapter.magnitude.shape, generator=gen) + 0.5)


def three_adapters() -> nn.Module:
    model = apply_dora(build("llama"), DEFAULT)
    apply_dora(model, SECOND, adapter_name="second")
    apply_dora(model, LORA, adapter_name="lora")
    randomize(model)
    return model.eval()


def alone(model: nn.Module, name: str, config: DoRAConfig) -> nn.Module:
    """A fresh base adapted with ``config`` only, holding adapter ``name``'s values of ``model``."""
    single = apply_dora(build("llama"), config).eval()
    with torch.no_grad():
        for layer_name, layer in dora_modules(single):
            theirs = model.get_submodule(layer_name).get_adapter(name)
            for param, value in theirs.named_factors().items():
                getattr(layer, param).copy_(value)
    return single


CONFIGS = {"default": DEFAULT, "second": SECOND, "lora": LORA}


def test_names_settings_and_targets():
    model = three_adapters()
    assert adapter_names(model) == ["default", "second", "lora"]
    assert active_adapter(model) == "default"
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapter_names == ["default", "second"]
    assert (q.get_adapter("second").rank, q.get_adapter("second").alpha) == (2, 3.0)
    assert q.get_adapter("second").dropout == 0.1
    o = model.model.layers[0].self_attn.o_proj  # newly targeted by "second" only
    assert isinstance(o, DoRALayer) and o.adapter_names == ["second"]
    assert model.model.layers[0].self_attn.v_proj.get_adapter("lora").magnitude is None


@pytest.mark.parametrize("name", ["default", "second", "lora"])
def test_the_active_adapter_computes_what_it_computes_alone(name):
    model = three_adapters()
    set_adapter(model, name)
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert (
            rel_err(output(model, inputs), output(alone(model, name, CONFIGS[name]), inputs))
            <= 1e-6
        )
        with disable_adapter(model):
            assert rel_err(output(model, inputs), output(build("llama"), inputs)) <= 1e-6


def test_only_the_active_adapter_trains_and_a_frozen_magnitude_stays_frozen():
    model = apply_dora(build("llama"), DEFAULT)
    frozen_m = DoRAConfig(target_modules=["q_proj"], magnitude_trainable=False)
    apply_dora(model, frozen_m, adapter_name="frozen_m")

    def trainable() -> set[str]:
        return {n.split(".adapters.")[1] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == {f"default.{p}" for p in ("lora_A", "lora_B", "magnitude")}
    set_adapter(model, "frozen_m")
    assert trainable() == {"frozen_m.lora_A", "frozen_m.lora_B"}
    set_adapter(model, "default")
    set_adapter(model, "frozen_m")
    assert trainable() == {"frozen_m.lora_A", "frozen_m.lora_B"}
    model.model.layers[0].self_attn.q_proj.get_adapter("frozen_m").magnitude.requires_grad_(True)
    set_adapter(model, "default")
    set_adapter(model, "frozen_m")  # the user's own choice is kept too
    assert "frozen_m.magnitude" in trainable()


def test_refusals_name_the_problem():
    model = three_adapters()
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        apply_dora(model, SECOND, adapter_name="second")
    with pytest.raises(
        KeyError, match=r"no adapter named 'third'.*\['default', 'second', 'lora'\]"
    ):
        set_adapter(model, "third")
    with pytest.raises(TypeError, match="one adapter at a time"):
        set_adapter(model, ["default", "second"])
    for bad in ["..", "a/b", "", "a.b", " x", "keys"]:
        with pytest.raises(ValueError, match="adapter name"):
            apply_dora(model, SECOND, adapter_name=bad)
    merge_adapter(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapter(model, "second")
    with pytest.raises(RuntimeError, match="is merged already"):
        merge_adapter(model, "second")
    unmerge_adapter(model)


def test_delete_adapter():
    model = three_adapters()
    delete_adapter(model, "default")  # the active one: the first remaining becomes active
    assert adapter_names(model) == ["second", "lora"] and active_adapter(model) == "second"
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert (
            rel_err(output(model, inputs), output(alone(model, "second", SECOND), inputs)) <= 1e-6
        )
    delete_adapter(model, "second")
    attention = model.model.layers[0].self_attn
    assert type(attention.q_proj) is nn.Linear and type(attention.o_proj) is nn.Linear
    assert isinstance(attention.v_proj, DoRALayer)
    with pytest.raises(ValueError, match="only adapter"):
        delete_adapter(model, "lora")


@pytest.mark.parametrize("name", [None, "second"])
def test_merge_and_unload_merges_one_adapter_and_drops_the_others(name):
    model = three_adapters()
    chosen = name or "default"
    set_adapter(model, chosen)
    set_adapter(model, "lora")  # the active one is not the one merged when a name is given
    if name is None:
        set_adapter(model, chosen)
    inputs = example_inputs("llama")
    with torch.no_grad():
        expected = output(alone(model, chosen, CONFIGS[chosen]), inputs)
        merged = merge_and_unload(model, adapter_name=name)
        assert not any(isinstance(m, DoRALayer) for m in merged.modules())
        assert rel_err(output(merged, inputs), expected) <= 1e-5


# ----------------------------------------------------------------------------- files
def test_peft_reads_our_multi_adapter_folder(tmp_path):
    model = three_adapters()
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} >= {"second", "lora"}
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    for name in ("second", "lora"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    inputs = example_inputs("llama")
    with torch.no_grad():
        for name in ("default", "second", "lora"):
            set_adapter(model, name)
            theirs.set_adapter(name)
            assert rel_err(output(theirs, inputs), output(model, inputs)) <= 1e-5, name


def test_we_read_peft_multi_adapter_folder(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        build("llama"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                        init_lora_weights=False),
    )  # fmt: skip
    theirs.add_adapter(
        "second",
        peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "v_proj"], use_dora=True,
                        init_lora_weights=False),
    )  # fmt: skip
    theirs.save_pretrained(tmp_path)
    model = load_adapter(build("llama"), tmp_path)
    load_adapter(model, tmp_path / "second", adapter_name="second")
    assert adapter_names(model) == ["default", "second"] and active_adapter(model) == "default"
    theirs.eval()
    model.eval()
    inputs = example_inputs("llama")
    with torch.no_grad():
        for name in ("default", "second"):
            theirs.set_adapter(name)
            set_adapter(model, name)
            assert rel_err(output(model, inputs), output(theirs, inputs)) <= 1e-5, name


def test_save_one_adapter_and_round_trip(tmp_path):
    model = three_adapters()
    save_adapter(model, tmp_path, adapter_name="second")
    assert not (tmp_path / "adapter_config.json").exists()  # PEFT's place for "second"
    fresh = load_adapter(build("llama"), tmp_path / "second", adapter_name="second").eval()
    set_adapter(model, "second")
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(fresh, inputs), output(model, inputs))
    with pytest.raises(ValueError, match="adapter name"):
        save_adapter(model, tmp_path, adapter_name="../x")


def test_a_failed_load_of_a_second_adapter_leaves_the_model_as_it_was(tmp_path):
    model = three_adapters()
    save_adapter(apply_dora(build("gpt2"), DoRAConfig(target_modules=["c_attn"])), tmp_path)
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(model, tmp_path, adapter_name="other")
    assert adapter_names(model) == ["default", "second", "lora"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- combination
def test_combining_one_adapter_at_weight_one_reproduces_it():
    model = three_adapters()
    combine_adapters(model, {"second": 1.0}, "copy")
    set_adapter(model, "copy")
    inputs = example_inputs("llama")
    with torch.no_grad():
        got = output(model, inputs)
        set_adapter(model, "second")
        assert rel_err(got, output(model, inputs)) <= 1e-6
        combine_adapters(model, {"second": 0.0}, "nothing")
        set_adapter(model, "nothing")
        assert rel_err(output(model, inputs), output(build("llama"), inputs)) <= 1e-6


def test_combination_equals_the_naive_definition():
    model = three_adapters()
    weights = {"default": 0.7, "second": -0.4}
    combine_adapters(model, weights, "mix")
    layer = model.model.layers[1].self_attn.q_proj  # holds both
    W = layer.weight.detach().double()
    m0 = W.norm(dim=1)
    delta = sum(
        w * a.scaling * (a.lora_B.double() @ a.lora_A.double())
        for a, w in ((layer.get_adapter(n), w) for n, w in weights.items())
    )
    m = m0 + sum(w * (layer.get_adapter(n).magnitude.double() - m0) for n, w in weights.items())
    expected = naive_dora_weight(W + delta, torch.zeros(1, W.shape[1]).double(),
                                 torch.zeros(W.shape[0], 1).double(), m, 1.0)  # fmt: skip
    mix = layer.get_adapter("mix")
    got = naive_dora_weight(
        W, mix.lora_A.double(), mix.lora_B.double(), mix.magnitude.double(), mix.scaling
    )
    assert rel_err(got, expected) <= 1e-6
    assert mix.rank == 4 + 2 and mix.scaling == 1.0


def test_combined_adapter_saves_loads_in_peft_and_merges(tmp_path):
    model = three_adapters()
    combine_adapters(model, {"default": 0.5, "second": 0.5}, "mix")
    set_adapter(model, "mix")
    inputs = example_inputs("llama")
    save_adapter(model, tmp_path, adapter_name="mix")
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "mix").eval()
    with torch.no_grad():
        expected = output(model, inputs)
        assert rel_err(output(theirs, inputs), expected) <= 1e-5
        assert rel_err(output(merge_and_unload(model), inputs), expected) <= 1e-5


def test_combination_refusals():
    model = three_adapters()
    with pytest.raises(ValueError, match="mix DoRA and plain LoRA"):
        combine_adapters(model, {"default": 1.0, "lora": 1.0}, "bad")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        combine_adapters(model, {"nope": 1.0}, "bad")
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        combine_adapters(model, {"default": 1.0}, "second")
    with pytest.raises(ValueError, match="finite"):
        combine_adapters(model, {"default": float("nan")}, "bad")
    assert adapter_names(model) == ["default", "second", "lora"]
