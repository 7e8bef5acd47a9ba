"""Adapter folders: PEFT loads ours unchanged, we load PEFT's, our round trip is bitwise, and
every broken folder gives an AdapterFileError that says what is wrong."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchdora
from model_zoo import build, example_inputs, output, perturb_adapters
from reference import rel_err
from torchdora import DoRAConfig, apply_dora
from torchdora.io import (
    AdapterFileError,
    inspect_adapter,
    load_adapter,
    save_adapter,
    save_merged,
)
from torchdora.io.peft_format import peft_state_dict

peft = pytest.importorskip("peft")

#: model, targets exercising Linear, Conv1D (fan_in_fan_out), Conv2d, Embedding, modules_to_save
CASES = {
    "bert": ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "rank": 4}),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "c_fc"]}),
    "cnn-conv2d": ("cnn", {"target_modules": ["conv1", "conv3", "fc"], "rank": 4}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "o_proj"], "rank": 4}),
    "bert-bias-dora-only": ("bert", {"target_modules": ["query", "value"], "bias": "dora_only"}),
    "bert-bias-all": (
        "bert",
        {"target_modules": ["query", "value"], "bias": "all", "modules_to_save": ["classifier"]},
    ),
}
PEFT_BIAS = {"none": "none", "dora_only": "lora_only", "all": "all"}


def trained(name: str, steps: int = 3, **config) -> torch.nn.Module:
    """A torchdora-adapted model after a few real optimizer steps."""
    model = apply_dora(build(name), DoRAConfig(**config))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        output(model, example_inputs(name, batch=4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_our_adapter_with_same_outputs(case, tmp_path):
    name, config = CASES[case]
    ours = trained(name, **config)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(name), tmp_path).eval()
    inputs = example_inputs(name)
    with torch.no_grad():
        assert rel_err(output(theirs, inputs), output(ours, inputs)) <= 1e-5
        assert rel_err(output(build(name), inputs), output(ours, inputs)) > 1e-4  # it did train


@pytest.mark.parametrize("case", CASES)
def test_we_load_peft_adapter_with_same_outputs(case, tmp_path):
    name, config = CASES[case]
    peft_config = peft.LoraConfig(
        r=config.get("rank", 8),
        lora_alpha=16,
        target_modules=config["target_modules"],
        modules_to_save=config.get("modules_to_save"),
        bias=PEFT_BIAS[config.get("bias", "none")],
        use_dora=True,
        init_lora_weights=False,  # non-zero B: outputs differ from the base
    )
    theirs = peft.get_peft_model(build(name), peft_config).eval()
    with torch.no_grad():  # PEFT inits the magnitude to ‖W‖: move it too
        for module in theirs.modules():
            for vector in getattr(module, "lora_magnitude_vector", {}).values():
                vector.weight.mul_(torch.empty_like(vector.weight).uniform_(0.8, 1.2))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(build(name), tmp_path).eval()
    inputs = example_inputs(name)
    with torch.no_grad():
        assert rel_err(output(ours, inputs), output(theirs, inputs)) <= 1e-5
        assert rel_err(output(build(name), inputs), output(ours, inputs)) > 1e-4


def test_peft_plain_lora_adapter_loads_as_lora(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(build("llama"), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(build("llama"), tmp_path).eval()
    assert all(not layer.use_dora for _, layer in torchdora.dora_modules(ours))
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert rel_err(output(ours, inputs), output(theirs, inputs)) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_our_round_trip_is_bitwise(case, tmp_path):
    name, config = CASES[case]
    model = apply_dora(build(name), DoRAConfig(**config))
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(build(name), tmp_path)
    before, after = peft_state_dict(model), peft_state_dict(loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    inputs = example_inputs(name)
    with torch.no_grad():
        assert torch.equal(output(model.eval(), inputs), output(loaded.eval(), inputs))


def test_load_into_model_that_already_has_adapters(tmp_path):
    model = trained("llama", target_modules=["q_proj", "v_proj"])
    save_adapter(model, tmp_path)
    target = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"]))
    load_adapter(target, tmp_path)
    inputs = example_inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(target.eval(), inputs), output(model, inputs))


def test_peft_sequence_classification_adapter(tmp_path):
    """PEFT lists ``modules_to_save: ["classifier", "score"]`` for every SEQ_CLS adapter and
    ignores the entry a model lacks; a rank_pattern key for no adapted module is ignored too."""
    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,
        r=4,
        target_modules=["query", "value"],
        rank_pattern={"key": 2},
        use_dora=True,
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(build("bert"), config).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].bias.add_(1.0)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier",
        "score",
    ]
    ours = load_adapter(build("bert"), tmp_path).eval()
    inputs = example_inputs("bert")
    with torch.no_grad():
        assert rel_err(output(ours, inputs), output(theirs, inputs)) <= 1e-5


def test_frozen_magnitude_stays_frozen(tmp_path):
    model = apply_dora(
        build("llama"), DoRAConfig(target_modules=["q_proj"], magnitude_trainable=False)
    )
    save_adapter(model, tmp_path)
    loaded = load_adapter(build("llama"), tmp_path)
    assert torchdora.count_trainable_parameters(loaded) == torchdora.count_trainable_parameters(
        model
    )
    assert all(not layer.magnitude.requires_grad for _, layer in torchdora.dora_modules(loaded))
    assert peft.PeftModel.from_pretrained(build("llama"), tmp_path) is not None  # PEFT still loads


def test_half_precision_adapter_into_float32_model(tmp_path):
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj"]))
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    loaded = load_adapter(build("llama"), tmp_path)
    for _, layer in torchdora.dora_modules(loaded):
        assert layer.magnitude.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    original = peft_state_dict(model)
    for key, value in peft_state_dict(loaded).items():
        assert torch.equal(value, original[key].to(torch.bfloat16).float()), key


def test_metadata_and_inspect(tmp_path):
    model = trained("bert", **CASES["bert"][1])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    summary = inspect_adapter(tmp_path)
    assert summary.torchdora_version == torchdora.__version__
    assert summary.method == "DoRA" and summary.ranks == {8: 4}
    assert len(summary.targets) == 4 and summary.modules_to_save == ["classifier"]
    expected = sum(t.numel() for t in load_file(tmp_path / "adapter_model.safetensors").values())
    assert summary.num_parameters == expected
    assert "DoRA" in str(summary)


def test_save_merged_loads_without_torchdora(tmp_path):
    name = "bert"
    model = trained(name, **CASES[name][1])
    save_merged(model, tmp_path)
    plain = torch.nn.Module  # the merged folder loads with transformers alone
    reloaded = type(build(name)).from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, torchdora.DoRALayer) for m in reloaded.modules())
    assert isinstance(reloaded, plain)
    inputs = example_inputs(name)
    with torch.no_grad():
        assert rel_err(output(reloaded, inputs), output(model, inputs)) <= 1e-5
    assert any(isinstance(m, torchdora.DoRALayer) for m in model.modules())  # untouched


def test_save_merged_plain_module(tmp_path):
    model = trained("cnn", **CASES["cnn-conv2d"][1])
    save_merged(model, tmp_path)
    fresh = build("cnn")
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    inputs = example_inputs("cnn")
    with torch.no_grad():
        assert rel_err(output(fresh, inputs), output(model, inputs)) <= 1e-5


# --------------------------------------------------------------------------- failures
@pytest.fixture
def saved(tmp_path):
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"], rank=4))
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(build("llama"), tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is missing"):
        load_adapter(build("llama"), saved)


def test_pickle_file_is_refused(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="never unpickles"):
        load_adapter(build("llama"), saved)


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_truncated_weights(saved, cut):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: cut if cut >= 0 else len(data) - 16])
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        load_adapter(build("llama"), saved)


def test_bad_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(build("llama"), saved)
    (saved / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="JSON object"):
        load_adapter(build("llama"), saved)


def test_config_of_another_method(saved):
    _edit_config(saved, peft_type="IA3")
    with pytest.raises(AdapterFileError, match="peft_type is 'IA3'"):
        load_adapter(build("llama"), saved)


def test_config_with_wrong_types(saved):
    _edit_config(saved, r="eight")  # ours: the weights carry the config they were saved with
    with pytest.raises(AdapterFileError, match=r"does not belong to the weights.*r is 'eight'"):
        load_adapter(build("llama"), saved)
    _edit_tensors(saved, lambda t: None)  # rewritten without metadata, as PEFT writes it
    with pytest.raises(AdapterFileError, match="'r' must be int"):
        load_adapter(build("llama"), saved)


@pytest.mark.parametrize(
    "shape, difference",
    [
        ((32, 3), r"\(rank mismatch\)"),
        ((16, 4), r"\(the adapter was trained on a model with other layer sizes\)"),
        ((16, 3), r"\(rank mismatch, and the adapter was trained on a model with other layer"),
    ],
)
def test_wrong_shape_names_key_shapes_and_what_differs(saved, shape, difference):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_tensors(saved, lambda t: t.__setitem__(key, torch.zeros(shape)))
    found = re.escape(str(shape))
    expected = rf"q_proj\.lora_B\.weight: expected shape \(32, 4\), found {found} {difference}"
    with pytest.raises(AdapterFileError, match=expected):
        load_adapter(build("llama"), saved)


def test_rank_mismatch_with_existing_adapters(saved):
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"], rank=8))
    with pytest.raises(AdapterFileError, match="rank mismatch"):
        load_adapter(model, saved)


def test_other_scaling_than_existing_adapters_is_refused(saved):
    config = DoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, alpha=4)
    model = apply_dora(build("llama"), config)
    before = peft_state_dict(model)
    with pytest.raises(AdapterFileError, match=r"q_proj: DoRA, alpha 4 here, DoRA, alpha 16 in"):
        load_adapter(model, saved)
    _edit_config(saved, use_rslora=True, lora_alpha=4)
    _edit_tensors(saved, lambda t: None)  # as PEFT writes it: no config copy in the metadata
    with pytest.raises(AdapterFileError, match=r"alpha 4 here, DoRA, alpha 4, rsLoRA in the file"):
        load_adapter(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in peft_state_dict(model).items())


@pytest.mark.parametrize(
    "option, value", [("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 1]])]
)
def test_peft_options_torchdora_lacks_are_refused(saved, option, value):
    _edit_config(saved, **{option: value})
    _edit_tensors(saved, lambda t: None)  # as PEFT writes it: no config copy in the metadata
    with pytest.raises(AdapterFileError, match=f"sets {option}=.*does not implement"):
        load_adapter(build("llama"), saved)


@pytest.mark.parametrize("setting", [{"use_rslora": True}, {"use_dora": False}, {"dropout": 0.1}])
def test_save_refuses_layers_with_settings_peft_holds_once(tmp_path, setting):
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj"]))
    apply_dora(model, DoRAConfig(target_modules=["v_proj"], **setting))
    key = {"dropout": "lora_dropout"}.get(*setting, *setting)
    with pytest.raises(ValueError, match=f"holds one {key} .* these layers mix"):
        save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_keys_for_modules_the_model_lacks(saved):
    extra = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
    _edit_tensors(saved, lambda t: t.__setitem__(extra, torch.zeros(4, 32)))
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"layers\.9\.self_attn\.q_proj"):
        load_adapter(model, saved)
    # the model is left as it was: no adapters, nothing frozen, same weights
    assert not any(isinstance(m, torchdora.DoRALayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inspect_refuses_what_loading_refuses(saved):
    _edit_tensors(saved, lambda t: None)  # as PEFT writes it: no torchdora metadata
    assert "written by  PEFT or another tool" in str(inspect_adapter(saved))
    _edit_config(saved, r=2)
    with pytest.raises(AdapterFileError, match="does not match the tensors' ranks"):
        inspect_adapter(saved)


def test_adapter_of_another_architecture_names_the_modules(saved):
    with pytest.raises(AdapterFileError, match=r"modules this model does not have: \['base_mod"):
        load_adapter(build("bert"), saved)


def test_non_finite_values_are_refused(saved):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    _edit_tensors(saved, lambda t: t[key].__setitem__(0, float("nan")))
    with pytest.raises(AdapterFileError, match=r"v_proj\.lora_magnitude_vector holds NaN"):
        load_adapter(build("llama"), saved)


def test_failed_save_keeps_previous_adapter(saved, monkeypatch):
    before = load_file(saved / "adapter_model.safetensors")
    model = apply_dora(build("llama"), DoRAConfig(target_modules=["q_proj", "v_proj"], rank=4))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("torchdora.io.files.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, saved)
    after = load_file(saved / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in saved.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="apply_dora first"):
        save_adapter(build("llama"), tmp_path)
