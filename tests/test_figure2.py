"""The DoRA paper's figure-2 protocol (``torchdora analyze --module-type query --checkpoints 4``):
the checkpoint and layer selection by hand, the slope and r against numpy, and a whole analysis
of four tiny training runs against ΔM/ΔD recomputed here in float64 from dense weights."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdora
from torchdora.analysis import (
    DECOMPOSITION_FILE,
    DecompositionTracker,
    relations,
    select_checkpoints,
    select_module_type,
)
from torchdora.analysis.figure2 import slope
from torchdora.cli import main


def record(step: int, layers: dict[str, tuple[float, float]], method: str = "DoRA") -> dict:
    return {
        "step": step,
        "method": method,
        "layers": {name: {"delta_d": d, "delta_m": m} for name, (d, m) in layers.items()},
    }


@pytest.mark.parametrize(
    ("recorded", "count", "chosen"),
    [
        (range(0, 41, 10), 4, [10, 20, 30, 40]),  # the study's runs: 3 intermediate + final
        (range(0, 101, 10), 4, [30, 50, 80, 100]),  # the ⌈j·10/4⌉-th of 10 steps
        (range(0, 61, 10), 4, [20, 30, 50, 60]),
        (range(0, 21, 10), 4, [10, 20]),  # fewer recorded: all of them
        (range(0, 101, 10), 1, [100]),
    ],
)
def test_checkpoints_are_the_last_and_evenly_spread_before_it(recorded, count, chosen):
    records = [record(step, {"q": (0.1, 0.2)}) for step in reversed(recorded)]
    assert [r["step"] for r in select_checkpoints(records, count)] == chosen


def test_checkpoints_must_be_positive():
    with pytest.raises(ValueError, match="--checkpoints must be a positive integer, got 0"):
        select_checkpoints([record(10, {"q": (0.1, 0.2)})], 0)


def test_module_type_keeps_that_type_only_and_names_the_types_found():
    layers = {"enc.0.query": (1, 2), "enc.0.value": (3, 4), "enc.1.attention.query": (5, 6)}
    kept = select_module_type([record(10, layers)], "query", "run")
    assert list(kept[0]["layers"]) == ["enc.0.query", "enc.1.attention.query"]
    with pytest.raises(ValueError, match=r"run has no layers of module type 'key'; its types are "):
        select_module_type([record(10, layers)], "key", "run")
    with pytest.raises(ValueError, match="query, value: pick one"):
        select_module_type([record(10, layers)], "uery", "run")


def test_slope_and_correlation_against_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.random(20), rng.random(20)
    assert slope(x.tolist(), y.tolist()) == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)
    assert np.isnan(slope([1.0, 1.0], [2.0, 3.0]))
    points = [record(10, {f"l{i}": (x[i], y[i]) for i in range(10)})]
    points += [record(20, {f"l{i}": (x[i], y[i]) for i in range(10, 20)})]
    found = relations([record(0, {"l0": (0.0, 0.0)}), *points])["DoRA"]
    assert found["points"] == 20 and found["steps"] == [10, 20]
    assert found["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert found["per_checkpoint"][1]["slope"] == pytest.approx(np.polyfit(x[10:], y[10:], 1)[0])


# ----------------------------------------------------------------------------- four training runs
class Blocks(nn.Module):
    """Three blocks with a ``query`` and a ``value`` projection each."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8)}) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block["query"](x) + block["value"](x))
        return x


def base_weight(module: nn.Module) -> np.ndarray:
    """W0 in float64: the weight before training (DoRA's m⁰ = ‖W0‖ is its float32 rounding,
    so W' at the start is not exactly W0)."""
    layer = module if isinstance(module, nn.Linear) else module.base_layer
    return layer.weight.detach().double().numpy()


def dense_weight(module: nn.Module) -> np.ndarray:
    """The adapted weight in float64 from the layer's parameters, by the formulas of the
    method (DoRA paper eqs. 2 and 5, the seed guide's no-norm ablation), not torchdora's code."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().double().numpy()
    W0 = base_weight(module)
    A, B = (p.detach().double().numpy() for p in (module.lora_A, module.lora_B))
    V = W0 + module.scaling * B @ A
    if not module.use_dora:
        return V
    m = module.magnitude.detach().double().numpy()[:, None]
    norm = np.linalg.norm(V if module.normalize else W0, axis=1, keepdims=True)
    return m * V / norm


def change(W0: np.ndarray, W1: np.ndarray) -> tuple[float, float]:
    """(ΔD, ΔM): mean 1 − cos and mean |‖W1_i‖ − ‖W0_i‖| over the rows."""
    n0, n1 = np.linalg.norm(W0, axis=1), np.linalg.norm(W1, axis=1)
    return float(np.mean(1 - (W0 * W1).sum(1) / (n0 * n1))), float(np.mean(np.abs(n1 - n0)))


def train(model: nn.Module, run_dir, modules: list[str] | None) -> dict[int, list]:
    """60 Adam steps onto a perturbed teacher, ΔM/ΔD recorded every 10; returns the
    query layers' (ΔD, ΔM) recomputed here at every recorded step."""
    torch.manual_seed(1)
    x = torch.randn(64, 8)
    teacher = copy.deepcopy(Blocks())
    with torch.no_grad():
        y = teacher(x)
    queries = [f"blocks.{i}.query" for i in range(3)]
    originals = [base_weight(model.get_submodule(name)) for name in queries]
    tracker = DecompositionTracker(model, modules=modules, path=run_dir / DECOMPOSITION_FILE)
    tracker(0, model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    expected = {}
    for step in range(1, 61):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            tracker(step, model)
            expected[step] = [
                change(W0, dense_weight(model.get_submodule(name)))
                for W0, name in zip(originals, queries, strict=True)
            ]
    return expected


def test_analyze_the_papers_way_matches_a_float64_recomputation(tmp_path, capsys):
    torch.manual_seed(0)
    base = Blocks()
    names = [f"blocks.{i}.{kind}" for i in range(3) for kind in ("query", "value")]
    models = {"FT": copy.deepcopy(base).requires_grad_(False)}
    for name in names:
        models["FT"].get_submodule(name).requires_grad_(True)
    for method, options in [
        ("LoRA", {"use_dora": False}),
        ("DoRA", {"use_dora": True}),
        ("DoRA (no norm)", {"use_dora": True, "normalize": False}),
    ]:
        config = torchdora.DoRAConfig(
            target_modules=["query", "value"], rank=2, alpha=4.0, **options
        )
        models[method] = torchdora.apply_dora(copy.deepcopy(base), config)
    expected, runs = {}, []
    for method, model in models.items():
        runs.append(tmp_path / method.replace(" ", "_"))
        runs[-1].mkdir()
        expected[method] = train(model, runs[-1], names if method == "FT" else None)

    out = tmp_path / "figure2"
    argv = ["analyze", *map(str, runs), "--module-type", "query", "--checkpoints", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "figure2.json").read_text())
    assert summary["module_type"] == "query" and list(summary["methods"]) == list(models)
    chosen = [20, 30, 50, 60]  # the 2nd, 3rd, 5th and 6th of steps 10…60
    printed = capsys.readouterr().out
    for method, found in summary["methods"].items():
        points = [p for step in chosen for p in expected[method][step]]
        d, m = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        assert (found["points"], found["steps"]) == (12, chosen), method
        assert found["slope"] == pytest.approx(np.polyfit(d, m, 1)[0], rel=1e-6), method
        assert found["pearson"] == pytest.approx(np.corrcoef(d, m)[0, 1], rel=1e-6), method
        for i, checkpoint in enumerate(found["per_checkpoint"]):
            at_step = slice(3 * i, 3 * i + 3)  # the three query layers at that step
            reference = np.polyfit(d[at_step], m[at_step], 1)[0]
            assert checkpoint["slope"] == pytest.approx(reference, rel=1e-6), (method, i)
        line = f"{method}: corr(ΔD, ΔM) = {found['pearson']:+.3f}, slope ΔM/ΔD = "
        assert line + f"{found['slope']:+.3g} over 12 points (query layers at steps 20, " in printed
