"""torchdora.analysis: ΔM/ΔD against hand-computed answers and a dense float64 reference, the
run files and their readers, the plots, and ΔM/ΔD tracked through a tiny training run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import torchdora
from torchdora.analysis import (
    DECOMPOSITION_FILE,
    METRICS_FILE,
    DecompositionTracker,
    LayerChange,
    analyze_runs,
    capture_reference,
    decomposition_change,
    decomposition_record,
    dense_change,
    infer_method,
    method_correlations,
    pearson,
    plot_decomposition,
    plot_loss_curves,
    read_decomposition,
    read_loss_curves,
    state_dict_change,
)

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------- the reference
def reference_change(W0: torch.Tensor, V: torch.Tensor, m: torch.Tensor | None = None):
    """ΔM, ΔD from dense rows in float64 between W0 and W' = m·V/‖V‖ (default: W' = V)."""
    W0, V = W0.double(), V.double()
    W1 = V if m is None else m.double().unsqueeze(1) * V / V.norm(dim=1, keepdim=True)
    delta_m = (W1.norm(dim=1) - W0.norm(dim=1)).abs().mean().item()
    delta_d = (1 - F.cosine_similarity(W1, W0, dim=1, eps=0.0)).mean().item()
    return delta_m, delta_d


def dense_rows(layer) -> torch.Tensor:
    """The base weight of a DoRA layer as d_out × fan_in, from the layer kinds' documented
    layouts (README table), not from torchdora's code."""
    W = layer.base_layer.weight.detach()
    if isinstance(layer, torchdora.DoRAEmbedding | torchdora.DoRAConv1D):
        return W.T
    return W.reshape(W.shape[0], -1)


def adapted_rows(layer) -> torch.Tensor:
    W = dense_rows(layer).double()
    return W + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()


def assert_change(actual, expected, rel=1e-9, atol=1e-12):
    assert actual == pytest.approx(expected, rel=rel, abs=atol)


# ----------------------------------------------------------------------------- dense, by hand
def test_dense_rescaled_rows_change_magnitude_only():
    W0 = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5, 2
    W1 = torch.tensor([[6.0, 8.0], [0.0, 1.0]])  # norms 10, 1, same directions
    assert_change(dense_change(W0, W1), (3.0, 0.0))  # mean(|10-5|, |1-2|)


def test_dense_rotated_rows_change_direction_only():
    W0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    W1 = torch.tensor([[0.5, math.sqrt(3) / 2], [-2.0, 0.0]], dtype=torch.float64)  # 60°, 90°
    assert_change(dense_change(W0, W1), (0.0, 0.75))  # mean(1 - 0.5, 1 - 0)


def test_dense_reversed_row_has_direction_change_two():
    assert_change(dense_change(torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -2.0]])), (0, 2))


def test_dense_matches_reference_on_random_weights():
    W0, W1 = torch.randn(40, 30), torch.randn(40, 30)
    assert_change(dense_change(W0, W1), reference_change(W0, W1))


def test_dense_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\) and \(4, 3\)"):
        dense_change(torch.zeros(3, 4), torch.zeros(4, 3))


# ----------------------------------------------------------------------------- adapters, by hand
def hand_built(use_dora: bool, W, A, B, magnitude=None) -> nn.Module:
    """A one-layer model: W (2×2), rank 1, s = 1, with the given A, B, m."""
    layer = torchdora.DoRALinear(2, 2, rank=1, alpha=1.0, use_dora=use_dora)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor(W))
        layer.lora_A.copy_(torch.tensor(A))
        layer.lora_B.copy_(torch.tensor(B))
        if magnitude is not None:
            layer.magnitude.copy_(torch.tensor(magnitude))
    return nn.Sequential(layer)


def change_of(model: nn.Module) -> tuple[float, float]:
    # The reference is W itself: the adapter analysis compares W + sBA with the frozen base.
    return decomposition_change(model, capture_reference(model))["0"]


# W = [[3, 4], [0, 2]], A = [[3, 4]], B = [[1], [0]]: V = [[6, 8], [0, 2]], directions unchanged.
SCALE = {"W": [[3.0, 4.0], [0.0, 2.0]], "A": [[3.0, 4.0]], "B": [[1.0], [0.0]]}
# W = I, A = [[0, 1]], B = [[1], [0]]: V = [[1, 1], [0, 1]], row 0 turned by 45°.
TURN = {"W": [[1.0, 0.0], [0.0, 1.0]], "A": [[0.0, 1.0]], "B": [[1.0], [0.0]]}


def test_dora_rescaling_changes_magnitude_only():
    model = hand_built(True, **SCALE, magnitude=[7.0, 2.0])
    assert_change(change_of(model), (1.0, 0.0))  # mean(|7-5|, |2-2|)


def test_dora_negative_magnitude_reverses_the_row():
    # W'_0 = -5·(0.6, 0.8) = -W_0: same norm, opposite direction (1 - cos = 2)
    model = hand_built(True, **SCALE, magnitude=[-5.0, 2.0])
    assert_change(change_of(model), (0.0, 1.0))


def test_lora_rescaling_changes_magnitude_by_the_row_norms():
    assert_change(change_of(hand_built(False, **SCALE)), (2.5, 0.0))  # ‖V‖ = 10, 2


def test_dora_rotation_with_kept_magnitude_changes_direction_only():
    model = hand_built(True, **TURN, magnitude=[1.0, 1.0])
    assert_change(change_of(model), (0.0, (1 - 1 / SQRT2) / 2))


def test_lora_rotation_also_changes_magnitude():
    assert_change(change_of(hand_built(False, **TURN)), ((SQRT2 - 1) / 2, (1 - 1 / SQRT2) / 2))


# ----------------------------------------------------------------------------- adapters, random
def randomize(layer, b_std: float) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_(std=b_std)
        if layer.magnitude is not None:
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(-0.5, 1.5))


def conv1d_layer():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return torchdora.DoRAConv1D(pytorch_utils.Conv1D(24, 16), rank=3)


LAYERS = {
    "dora-linear": lambda: torchdora.DoRALinear(16, 24, rank=4),
    "lora-linear": lambda: torchdora.LoRALinear(16, 24, rank=4),
    "dora-linear-bf16": lambda: torchdora.DoRALinear(16, 24, rank=4, dtype=torch.bfloat16),
    "dora-rslora": lambda: torchdora.DoRALinear(16, 24, rank=4, use_rslora=True),
    "dora-conv2d": lambda: torchdora.DoRAConv(nn.Conv2d(4, 6, 3, groups=2), rank=2),
    "lora-conv2d": lambda: torchdora.DoRAConv(nn.Conv2d(4, 6, 3), rank=2, use_dora=False),
    "dora-embedding": lambda: torchdora.DoRAEmbedding(nn.Embedding(20, 8), rank=3),
    "dora-conv1d": conv1d_layer,
}


@pytest.mark.parametrize("b_std", [0.3, 1e-4], ids=["large-update", "tiny-update"])
@pytest.mark.parametrize("kind", LAYERS)
def test_factored_change_matches_dense_float64(kind, b_std):
    layer = LAYERS[kind]()
    model = nn.Sequential(layer)
    reference = capture_reference(model)
    randomize(layer, b_std)
    expected = reference_change(dense_rows(layer), adapted_rows(layer), layer.magnitude)
    # tiny updates: ΔD ≈ 1e-9 is resolved (float32 arithmetic would give noise of ~1e-7).
    assert expected[1] > 0
    assert_change(decomposition_change(model, reference)["0"], expected, rel=1e-6, atol=0)


def test_unchanged_adapter_has_no_change():
    model = torchdora.apply_dora(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
        torchdora.DoRAConfig(target_modules="all-linear"),
    )
    changes = decomposition_change(model, capture_reference(model))
    assert set(changes) == {"0", "1"}
    for change in changes.values():  # B = 0; m = ‖W_i‖ rounded to float32
        assert change.delta_d == pytest.approx(0.0, abs=1e-15)
        assert change.delta_m == pytest.approx(0.0, abs=1e-6)


def test_model_level_change_covers_every_adapted_layer():
    model = torchdora.apply_dora(
        nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6)),
        torchdora.DoRAConfig(target_modules="all-linear", rank=2),
    )
    reference = capture_reference(model)
    for _, layer in torchdora.dora_modules(model):
        randomize(layer, 0.2)
    changes = decomposition_change(model, reference)
    for name, layer in torchdora.dora_modules(model):
        expected = reference_change(dense_rows(layer), adapted_rows(layer), layer.magnitude)
        assert_change(changes[name], expected, rel=1e-9)


# ----------------------------------------------------------------------------- full fine-tuning
class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 7)
        self.conv = nn.Conv2d(3, 5, 3)
        self.emb = nn.Embedding(11, 6)


PLAIN_ROWS = {  # the documented row convention of each kind (README table)
    "fc": lambda m: m.fc.weight,
    "conv": lambda m: m.conv.weight.reshape(5, -1),
    "emb": lambda m: m.emb.weight.T,
}


def test_full_fine_tune_of_named_modules_matches_dense_reference():
    model = Plain()
    before = copy.deepcopy(model)
    reference = capture_reference(model, modules=list(PLAIN_ROWS))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.1)
    changes = decomposition_change(model, reference)
    for name, rows in PLAIN_ROWS.items():
        assert_change(changes[name], reference_change(rows(before), rows(model)))


def test_reference_captured_before_apply_dora_serves_the_adapted_model():
    model = nn.Sequential(nn.Linear(6, 5))
    reference = capture_reference(model, modules=["0"])
    torchdora.apply_dora(model, torchdora.DoRAConfig(target_modules=["0"], rank=2))
    layer = model[0]
    randomize(layer, 0.3)
    expected = reference_change(dense_rows(layer), adapted_rows(layer), layer.magnitude)
    assert_change(decomposition_change(model, reference)["0"], expected)


def test_state_dict_change_compares_weight_matrices():
    before = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Conv1d(4, 3, 2))
    after = copy.deepcopy(before)
    with torch.no_grad():
        for param in after.parameters():
            param.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.05)
    changes = state_dict_change(before.state_dict(), after.state_dict())
    assert set(changes) == {"0", "2"}  # weights only; biases are not matrices
    assert_change(changes["0"], reference_change(before[0].weight, after[0].weight))
    conv_before, conv_after = before[2].weight.reshape(3, -1), after[2].weight.reshape(3, -1)
    assert_change(changes["2"], reference_change(conv_before, conv_after))


def test_state_dict_change_names_missing_keys():
    with pytest.raises(KeyError, match="'w' is not in the after state dict"):
        state_dict_change({"w": torch.ones(2, 2)}, {}, keys=["w"])


# ----------------------------------------------------------------------------- errors
def test_model_without_adapters_needs_module_names():
    with pytest.raises(ValueError, match="full fine-tune pass modules="):
        capture_reference(nn.Sequential(nn.Linear(2, 2)))


def test_unknown_module_is_named():
    with pytest.raises(ValueError, match="no module named 'nope'"):
        capture_reference(nn.Sequential(nn.Linear(2, 2)), modules=["nope"])


def test_module_without_weight_matrix_is_refused():
    with pytest.raises(TypeError, match="LayerNorm has no weight matrix"):
        capture_reference(nn.Sequential(nn.LayerNorm(4)), modules=["0"])


def test_merged_layer_is_refused():
    model = nn.Sequential(torchdora.DoRALinear(4, 4, rank=2))
    reference = capture_reference(model)
    torchdora.merge_adapter(model)
    with pytest.raises(ValueError, match=r"'0' is merged.*unmerge_adapter"):
        decomposition_change(model, reference)
    torchdora.unmerge_adapter(model)
    assert_change(decomposition_change(model, reference)["0"], (0.0, 0.0), atol=1e-6)


def test_changed_base_weight_is_refused():
    model = nn.Sequential(torchdora.DoRALinear(4, 4, rank=2))
    reference = capture_reference(model)
    with torch.no_grad():
        model[0].base_layer.weight.mul_(1.01)
    with pytest.raises(ValueError, match="base weight of '0' has changed"):
        decomposition_change(model, reference)


# ----------------------------------------------------------------------------- records and files
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_decomposition_file_round_trip_is_tolerant(tmp_path):
    path = tmp_path / DECOMPOSITION_FILE
    first = decomposition_record(10, "DoRA", {"q": LayerChange(0.5, 0.25)})
    assert first == {
        "step": 10,
        "method": "DoRA",
        "layers": {"q": {"delta_m": 0.5, "delta_d": 0.25}},
    }
    again = decomposition_record(10, "DoRA", {"q": LayerChange(0.6, 0.3)})
    earlier = decomposition_record(5, "DoRA", {"q": LayerChange(0.1, 0.2)})
    lines = [json.dumps(r) for r in (first, earlier)]
    lines += ["", '{"step": 7, "layers": {"q": {"delta_m": "x"}}}', json.dumps(again), '{"step": 1']
    write_lines(path, lines)
    with pytest.warns(UserWarning) as caught:
        records = read_decomposition(path)
    assert records == [earlier, again]  # sorted by step; the repeated step 10: the last wins
    messages = [str(w.message) for w in caught]
    assert any("malformed" in m for m in messages)
    assert any(m.startswith(f"{path}:6: not a JSON object") for m in messages)


def test_loss_curves_are_read_per_metric(tmp_path):
    path = tmp_path / METRICS_FILE
    write_lines(
        path,
        [
            '{"step": 1, "loss": 2.0, "lr": 0.1}',
            '{"step": 2, "loss": NaN}',
            '{"step": 2, "eval_loss": 1.5, "eval_accuracy": 0.5}',
            '{"loss": 9.0}',
            '{"step": 3, "loss": 1.0}',
            '{"step": 1, "loss": 1.8}',
        ],
    )
    with pytest.warns(UserWarning, match="without a step"):
        curves = read_loss_curves(path)
    assert curves == {"loss": [(1, 1.8), (3, 1.0)], "eval_loss": [(2, 1.5)]}


def test_pearson_and_method_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # hand: cov 1, var 2, var 2
    assert math.isnan(pearson([1, 1], [1, 2]))

    def layers(*pairs):  # (ΔD, ΔM) per layer
        return {f"l{i}": {"delta_m": m, "delta_d": d} for i, (d, m) in enumerate(pairs)}

    records = [
        {"step": 0, "method": "A", "layers": layers((0, 0), (0, 0))},  # left out: all zero
        {"step": 5, "method": "A", "layers": layers((1, 3), (2, 2))},
        {"step": 9, "method": "A", "layers": layers((3, 1))},
        {"step": 5, "method": "B", "layers": layers((1, 1), (2, 2))},
    ]
    assert method_correlations(records) == pytest.approx({"A": -1.0, "B": 1.0})


def test_infer_method():
    def adapted(**options):
        return torchdora.apply_dora(
            nn.Sequential(nn.Linear(3, 3)),
            torchdora.DoRAConfig(target_modules=["0"], rank=2, **options),
        )

    assert infer_method(nn.Sequential(nn.Linear(3, 3))) == "FT"
    assert infer_method(adapted(use_dora=False)) == "LoRA"
    assert infer_method(adapted()) == "DoRA"
    assert infer_method(adapted(magnitude_trainable=False)) == "DoRA (frozen m)"


# ----------------------------------------------------------------------------- plots
def assert_png(path, size):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        image.verify()
    with Image.open(path) as image:
        low, high = image.convert("L").getextrema()
        assert low < high  # something is drawn


def test_plot_decomposition_one_panel_per_method(tmp_path):
    records = [
        decomposition_record(
            step, method, {f"l{i}": LayerChange(0.1 * i + step, 0.01 * i) for i in range(4)}
        )
        for method in ("FT", "LoRA", "DoRA")
        for step in (0, 10, 20)
    ]
    path = plot_decomposition(records, tmp_path / "d.png", panel_size=(4.0, 3.0), dpi=50)
    assert_png(path, (3 * 200, 150))


def test_plot_loss_curves(tmp_path):
    curves = {
        "lora": {"loss": [(1, 2.0), (2, 1.5)], "eval_loss": [(2, 1.7)]},
        "dora": {"loss": [(1, 2.1), (2, 1.2)]},
    }
    assert_png(plot_loss_curves(curves, tmp_path / "l.png", size=(5.0, 3.0), dpi=40), (200, 120))


def test_plots_refuse_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no decomposition records"):
        plot_decomposition([], tmp_path / "d.png")
    with pytest.raises(ValueError, match="no loss curves"):
        plot_loss_curves({"run": {}}, tmp_path / "l.png")


def test_analyze_runs_names_missing_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze_runs([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with (
        pytest.warns(UserWarning, match="neither"),
        pytest.raises(ValueError, match="nothing to plot"),
    ):
        analyze_runs([tmp_path / "empty"], tmp_path / "out")


# ----------------------------------------------------------------------------- a tiny training run
def toy_task(seed: int = 0):
    """Regression onto a teacher: the base MLP with every weight perturbed."""
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for param in teacher.parameters():
            param.mul_(1 + 0.3 * torch.randn_like(param))
        x = torch.randn(64, 8)
        y = teacher(x)
    return base, x, y


TARGETS = ["0", "2"]


def train_run(model: nn.Module, run_dir, x, y, steps: int = 30, every: int = 10) -> None:
    """A plain loop that does what the training loop will: log metrics, call the tracker."""
    tracker = DecompositionTracker(model, modules=TARGETS, path=run_dir / DECOMPOSITION_FILE)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    tracker(0, model)
    with (run_dir / METRICS_FILE).open("w") as metrics:
        for step in range(1, steps + 1):
            loss = F.mse_loss(model(x[:48]), y[:48])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            metrics.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            if step % every == 0:
                with torch.no_grad():
                    eval_loss = F.mse_loss(model(x[48:]), y[48:]).item()
                metrics.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                tracker(step, model)


def test_lora_dora_and_full_fine_tune_points_through_training(tmp_path):
    base, x, y = toy_task()
    runs = {}
    for name, use_dora in (("lora", False), ("dora", True)):
        model = copy.deepcopy(base)
        config = torchdora.DoRAConfig(target_modules=TARGETS, rank=2, alpha=4.0, use_dora=use_dora)
        runs[name] = torchdora.apply_dora(model, config)
    full = copy.deepcopy(base).requires_grad_(False)
    for name in TARGETS:
        full.get_submodule(name).weight.requires_grad_(True)
    runs["ft"] = full
    for name, model in runs.items():
        (tmp_path / name).mkdir()
        train_run(model, tmp_path / name, x, y)

    for name, method in (("lora", "LoRA"), ("dora", "DoRA"), ("ft", "FT")):
        records = read_decomposition(tmp_path / name / DECOMPOSITION_FILE)
        assert [r["step"] for r in records] == [0, 10, 20, 30]
        assert {r["method"] for r in records} == {method}
        for record in records:
            assert set(record["layers"]) == set(TARGETS)
            for change in record["layers"].values():
                if record["step"] == 0:
                    # DoRA's m starts as ‖W_i‖ rounded to float32
                    assert change == pytest.approx({"delta_m": 0, "delta_d": 0}, abs=1e-6)
                else:  # training moved every layer in both magnitude and direction
                    assert change["delta_m"] > 0 and change["delta_d"] > 0
    # the last DoRA record is the model as trained: check it against the dense reference
    last = read_decomposition(tmp_path / "dora" / DECOMPOSITION_FILE)[-1]["layers"]
    for name, layer in torchdora.dora_modules(runs["dora"]):
        expected = reference_change(dense_rows(layer), adapted_rows(layer), layer.magnitude)
        assert (last[name]["delta_m"], last[name]["delta_d"]) == pytest.approx(expected, rel=1e-9)
    losses = read_loss_curves(tmp_path / "dora" / METRICS_FILE)
    assert losses["loss"][-1][1] < losses["loss"][0][1]  # the toy task is being learned

    records = [r for name in runs for r in read_decomposition(tmp_path / name / DECOMPOSITION_FILE)]
    correlations = method_correlations(records)
    assert set(correlations) == {"LoRA", "DoRA", "FT"}
    assert all(math.isfinite(r) for r in correlations.values())

    written = analyze_runs([tmp_path / name for name in runs], tmp_path / "plots")
    assert [p.name for p in written] == ["decomposition.png", "figure2.json", "loss.png"]
    assert_png(written[0], (3 * 400, 350))  # default panel 4 × 3.5 in at 100 dpi, 3 methods
    assert_png(written[2], (600, 400))
    found = json.loads(written[1].read_text())["methods"]
    assert {method: found[method]["pearson"] for method in found} == pytest.approx(correlations)
