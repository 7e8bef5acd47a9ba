"""Optimizer parameter groups and lr schedules, against explicit expectations and transformers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from torchdora import DoRALinear, LoRALinear
from torchdora.train import WarmupDecay, create_optimizer, get_parameter_groups, get_scheduler
from torchdora.train.optim import GROUP_NAMES


class Mixed(nn.Module):
    """A DoRA layer, a LoRA layer, a trained head (modules_to_save), a trained norm, a frozen
    Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.q = DoRALinear(8, 8, rank=2)
        self.v = LoRALinear(8, 8, rank=2)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.classifier = nn.Linear(8, 3)


def groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_split_adapter_parts_and_heads():
    model = Mixed()
    groups = groups_by_name(
        get_parameter_groups(
            model, 1e-3, loraplus_lr_ratio=4.0, weight_decay=0.1, magnitude_weight_decay=0.0
        )
    )
    expected = {
        "lora_A": ({model.q.lora_A, model.v.lora_A}, 1e-3, 0.1),
        "lora_B": ({model.q.lora_B, model.v.lora_B}, 4e-3, 0.1),
        "magnitude": ({model.q.magnitude}, 3e-3, 0.0),
        "other": ({model.classifier.weight}, 1e-3, 0.1),
        "other_no_decay": ({model.classifier.bias, model.norm.weight, model.norm.bias}, 1e-3, 0.0),
    }
    assert set(groups) == set(expected)
    for name, (params, lr, weight_decay) in expected.items():
        assert ids(groups[name]["params"]) == ids(params), name
        assert groups[name]["lr"] == pytest.approx(lr), name
        assert groups[name]["weight_decay"] == weight_decay, name
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert ids(model.frozen.parameters()).isdisjoint(grouped)
    assert set(grouped) == ids(p for p in model.parameters() if p.requires_grad)


def test_magnitude_lr_absolute_wins_over_ratio():
    model = Mixed()
    by_ratio = groups_by_name(get_parameter_groups(model, 2e-3, magnitude_lr_ratio=5.0))
    absolute = groups_by_name(
        get_parameter_groups(model, 2e-3, magnitude_lr=7e-4, magnitude_lr_ratio=5.0)
    )
    assert by_ratio["magnitude"]["lr"] == pytest.approx(1e-2)
    assert absolute["magnitude"]["lr"] == pytest.approx(7e-4)
    assert absolute["lora_A"]["lr"] == absolute["lora_B"]["lr"] == pytest.approx(2e-3)


def test_unfrozen_base_and_frozen_magnitude():
    """A trainable base weight is 'other'; a frozen magnitude is left out (plain DoRA direction)."""
    layer = DoRALinear(6, 4, rank=2, freeze_base=False)
    layer.magnitude.requires_grad_(False)
    groups = groups_by_name(get_parameter_groups(layer, 1e-3, weight_decay=0.01))
    assert "magnitude" not in groups
    assert ids(groups["other"]["params"]) == {id(layer.base_layer.weight)}
    assert ids(groups["other_no_decay"]["params"]) == {id(layer.base_layer.bias)}


def test_peft_parameter_names():
    """PEFT's DoRA keeps A/B/magnitude under ``lora_A.default.weight`` etc.; groups still fit."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(8, 8))
    base.add_module("head", nn.Linear(8, 2))
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=2, target_modules=["fc"], use_dora=True, modules_to_save=["head"]),
    )
    fc = model.base_model.model.fc
    head = model.base_model.model.head.modules_to_save["default"]
    groups = groups_by_name(get_parameter_groups(model, 1e-3, loraplus_lr_ratio=2.0))
    assert ids(groups["lora_A"]["params"]) == {id(fc.lora_A["default"].weight)}
    assert ids(groups["lora_B"]["params"]) == {id(fc.lora_B["default"].weight)}
    assert ids(groups["magnitude"]["params"]) == {id(fc.lora_magnitude_vector["default"].weight)}
    assert ids(groups["other"]["params"]) == {id(head.weight)}
    assert groups["lora_B"]["lr"] == pytest.approx(2e-3)


def test_create_optimizer_is_adamw_over_the_groups():
    model = Mixed()
    optimizer = create_optimizer(model, 1e-3, betas=(0.8, 0.9))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.param_groups] == list(GROUP_NAMES)
    assert all(g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)
    sgd = create_optimizer(model, 0.1, optimizer_cls=torch.optim.SGD, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": 1e-3, "loraplus_lr_ratio": 0.0}, "loraplus_lr_ratio"),
        ({"lr": 1e-3, "magnitude_lr": -1.0}, "magnitude_lr must be > 0"),
        ({"lr": 1e-3, "magnitude_lr_ratio": 0.0}, "magnitude_lr_ratio"),
    ],
)
def test_bad_group_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_parameter_groups(Mixed(), **kwargs)


def test_no_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(nn.Linear(3, 3).requires_grad_(False), 1e-3)


# --------------------------------------------------------------------------- schedules
def lr_trace(scheduler, optimizer, steps: int) -> list[tuple[float, ...]]:
    """The lr of each group before each of ``steps`` updates."""
    trace = []
    for _ in range(steps):
        trace.append(tuple(g["lr"] for g in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    return trace


def flat(trace):
    return [lr for lrs in trace for lr in lrs]


def two_group_optimizer() -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-3}])


@pytest.mark.parametrize(
    "kind, reference",
    [
        ("cosine", "get_cosine_schedule_with_warmup"),
        ("linear", "get_linear_schedule_with_warmup"),
        ("constant", "get_constant_schedule_with_warmup"),
    ],
)
@pytest.mark.parametrize("warmup, total", [(0, 17), (5, 17), (3, 3)])
def test_schedule_matches_transformers(kind, reference, warmup, total):
    transformers = pytest.importorskip("transformers")
    ours_opt, ref_opt = two_group_optimizer(), two_group_optimizer()
    ours = get_scheduler(ours_opt, kind, num_warmup_steps=warmup, num_training_steps=total)
    ref_kwargs = {"num_warmup_steps": warmup}
    if kind != "constant":
        ref_kwargs["num_training_steps"] = total
    ref = getattr(transformers, reference)(ref_opt, **ref_kwargs)
    ours_trace = lr_trace(ours, ours_opt, total)
    ref_trace = lr_trace(ref, ref_opt, total)
    assert flat(ours_trace) == pytest.approx(flat(ref_trace), abs=1e-12)
    # the group ratio (here 4, as LoRA+ would set) holds at every step
    assert all(b == pytest.approx(4 * a) for a, b in ours_trace)


def test_cosine_min_lr_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ours_opt, ref_opt = two_group_optimizer(), two_group_optimizer()
    ours = get_scheduler(
        ours_opt, "cosine", num_warmup_steps=4, num_training_steps=20, min_lr_ratio=0.1
    )
    ref = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        ref_opt, num_warmup_steps=4, num_training_steps=20, min_lr_rate=0.1
    )
    ours_trace, ref_trace = lr_trace(ours, ours_opt, 21), lr_trace(ref, ref_opt, 21)
    assert flat(ours_trace) == pytest.approx(flat(ref_trace), abs=1e-12)


def test_linear_min_lr_shape():
    f = WarmupDecay("linear", num_warmup_steps=2, num_training_steps=12, min_lr_ratio=0.25)
    values = [f(step) for step in range(13)]
    assert values[:3] == [0.0, 0.5, 1.0]
    assert values[12] == pytest.approx(0.25)
    assert f(40) == pytest.approx(0.25)  # stays at the floor past the end
    diffs = [b - a for a, b in itertools.pairwise(values[2:])]
    assert all(math.isclose(d, -0.075) for d in diffs)


@pytest.mark.parametrize(
    "args, message",
    [
        (("warm", 0, 10), "lr_scheduler_type"),
        (("cosine", 11, 10), "num_warmup_steps"),
        (("cosine", 0, 10, 1.5), "min_lr_ratio"),
    ],
)
def test_bad_schedule(args, message):
    with pytest.raises(ValueError, match=message):
        WarmupDecay(*args)
