"""``torchdora finetune --compare … --seeds …``: a study in one command, for both tasks. The
printed table, the paired differences and ``compare.json`` are checked against the runs' own
``metrics.json`` files, computed here by hand."""

from __future__ import annotations

import json
import math
import re

import pytest
import test_causal_lm
import test_cli

from torchdora.recipes.study import format_summary, summarize
from torchdora.recipes.tasks import Metric

tiny = test_cli.tiny  # the random-BERT folder and CSV of the CLI tests


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """The random-LLaMA folder and JSONL data of the causal-LM tests."""
    return test_causal_lm.build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def hand_mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table_row(printed: str, method: str) -> list[str]:
    """The cells of ``method``'s row of the printed table (``mean ± std`` kept together)."""
    [line] = [
        line for line in printed.splitlines() if line.split()[:1] == [method] and "−" not in line
    ]
    return re.split(r"\s{2,}", line.strip())[1:]


def test_seeds_and_compare_report_mean_std_and_paired_differences(tiny, tmp_path, capsys):
    out = tmp_path / "study"
    argv = test_cli.finetune_argv(tiny, out, "--compare", "lora,dora", "--seeds", "0,1")
    assert test_cli.main([*argv, "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    runs = {
        (method, seed): json.loads((out / method / f"seed{seed}" / "metrics.json").read_text())
        for method in ("lora", "dora")
        for seed in (0, 1)
    }
    for (method, seed), metrics in runs.items():
        config = json.loads((out / method / f"seed{seed}" / "config.json").read_text())
        assert (config["method"], config["seed"], metrics["steps"]) == (method, seed, 2)
    assert runs["lora", 0]["accuracy_before"] != runs["lora", 1]["accuracy_before"] or (
        runs["lora", 0]["loss_before"] != runs["lora", 1]["loss_before"]
    )  # another seed: another new head

    report = json.loads((out / "compare.json").read_text())
    assert (report["task"], report["methods"], report["seeds"]) == (
        "classification",
        ["lora", "dora"],
        [0, 1],
    )
    assert {(r["method"], r["seed"]): r["metrics"] for r in report["runs"]} == runs
    for method in ("lora", "dora"):
        cells = table_row(printed, method)
        for index, key in enumerate(("accuracy_before", "accuracy_after", "loss_after")):
            mean, std = hand_mean_std([runs[method, s][key] for s in (0, 1)])
            assert cells[index] == f"{mean:.4f} ± {std:.4f}", (method, key)
            summary = report["per_method"][method][key]
            assert summary["mean"] == pytest.approx(mean) and summary["std"] == pytest.approx(std)
        assert cells[3] == f"{runs[method, 0]['trainable_parameters']:,}"

    for key, label, higher_is_better in (
        ("accuracy_after", "acc after", True),
        ("loss_after", "loss after", False),
    ):
        differences = [runs["dora", s][key] - runs["lora", s][key] for s in (0, 1)]
        mean, std = hand_mean_std(differences)
        better = sum((d > 0) if higher_is_better else (d < 0) for d in differences)
        worse = sum((d < 0) if higher_is_better else (d > 0) for d in differences)
        pair = report["paired"]["dora"][key]
        assert pair["differences"] == pytest.approx(differences)
        assert pair["mean"] == pytest.approx(mean) and pair["std"] == pytest.approx(std)
        assert pair["favour"] == {"dora": better, "lora": worse, "tie": 2 - better - worse}
        line = f"  dora − lora  {label}: {mean:+.4f} ± {std:.4f}  (dora better in {better}, "
        assert line + f"lora in {worse}, tied in {2 - better - worse} of 2)" in printed
    assert "accuracy_before" not in report["paired"]["dora"]  # shown, not compared


def test_seeds_alone_run_the_one_method_at_each_seed(tiny, tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = test_cli.finetune_argv(tiny, out, "--method", "lora", "--seeds", "3,4")
    assert test_cli.main([*argv, "--max-steps", "1"]) == 0
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["seed3", "seed4"]
    report = json.loads((out / "compare.json").read_text())
    assert report["methods"] == ["lora"] and report["paired"] == {}
    assert "paired differences" not in capsys.readouterr().out


def test_causal_lm_compare_reports_held_out_loss(tiny_lm, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "finetune", "--task", "causal-lm",
        "--model", str(tiny_lm / "model"), "--data", str(tiny_lm / "pairs.jsonl"),
        "--max-steps", "2", "--batch-size", "8", "--lr", "3e-2", "--precision", "fp32",
        "--progress", "none", "--output", str(out), "--compare", "lora,dora",
    ]  # fmt: skip
    assert test_cli.main(argv) == 0
    printed = capsys.readouterr().out
    runs = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("lora", "dora")}
    assert all(
        metrics["task"] == "causal-lm" and metrics["steps"] == 2 for metrics in runs.values()
    )
    # the same seed and both adapters starting as the identity: the same loss before
    assert runs["dora"]["loss_before"] == pytest.approx(runs["lora"]["loss_before"], abs=1e-5)
    for method, metrics in runs.items():
        cells = table_row(printed, method)
        expected = [f"{metrics[k]:.4f}" for k in ("loss_before", "loss_after", "perplexity_after")]
        assert cells[:3] == expected
    difference = runs["dora"]["loss_after"] - runs["lora"]["loss_after"]
    assert f"dora − lora  loss after: {difference:+.4f}  (" in printed
    report = json.loads((out / "compare.json").read_text())
    assert report["task"] == "causal-lm" and report["seeds"] == [0]
    assert [m["key"] for m in report["metrics"]] == [
        "loss_before",
        "loss_after",
        "perplexity_after",
    ]
    assert report["paired"]["dora"]["loss_after"]["std"] is None  # one seed: no spread


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", ""], "--seeds needs at least one seed, e.g. --seeds 0,1,2"),
        (["--seeds", ",,"], "--seeds needs at least one seed"),
        (["--seeds", "0,1,0"], "--seeds lists 0 more than once"),
        (["--seeds", "1,01"], "--seeds lists a seed more than once"),
        (["--seeds", "0,one"], "--seeds must be integers separated by commas, got '0,one'"),
        (["--seeds", "0.5"], "--seeds must be integers"),
        (["--seeds", "0,1", "--seed", "2"], "--seed and --seeds both given: pick one"),
        (["--seeds", "0,1", "--compare", "lora,adalora"], "method must be one of"),
        (["--seeds", "0,1", "--resume", "somewhere"], "start their runs afresh"),
    ],
)
def test_bad_seeds_are_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "study"
    assert test_cli.finetune(tiny, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("torchdora finetune: error:"), err
    assert message in err[0], err
    assert not out.exists()


def test_an_earlier_study_is_not_overwritten_unasked(tiny, tmp_path, capsys):
    out = tmp_path / "study"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "metrics.json").write_text("{}")  # a single-seed run in the way
    assert test_cli.finetune(tiny, out, "--compare", "lora", "--seeds", "0,1") == 2
    assert "holds a single-seed run" in capsys.readouterr().err
    (out / "lora" / "metrics.json").unlink()
    (out / "compare.json").write_text("{}")
    assert test_cli.finetune(tiny, out, "--compare", "lora", "--seeds", "0,1") == 2
    assert "compare.json holds an earlier comparison: pass --overwrite" in capsys.readouterr().err
    assert (out / "compare.json").read_text() == "{}"


# ---------------------------------------------------------------------------- the summary maths
LOSS = Metric("loss", "loss", False)
ACCURACY = Metric("acc", "acc", True)
SHOWN = Metric("before", "before", None)


def fake_run(acc: float, loss: float) -> dict[str, float]:
    return {"acc": acc, "loss": loss, "before": 0.5, "trainable_parameters": 10,
            "time_per_step_s": 0.1, "peak_rss_mb": 100.0}  # fmt: skip


def test_paired_differences_follow_each_metrics_direction_and_count_ties():
    runs = {
        ("a", 0): fake_run(0.50, 1.0), ("b", 0): fake_run(0.60, 0.9),  # b better on both
        ("a", 1): fake_run(0.70, 0.8), ("b", 1): fake_run(0.70, 0.9),  # tie; b worse on loss
        ("a", 2): fake_run(0.80, 0.5), ("b", 2): fake_run(0.75, 0.4),  # b worse; b better
    }  # fmt: skip
    summary = summarize([SHOWN, ACCURACY, LOSS], ["a", "b"], [0, 1, 2], runs)
    acc, loss = summary["paired"]["b"]["acc"], summary["paired"]["b"]["loss"]
    assert acc["differences"] == pytest.approx([0.10, 0.0, -0.05])
    assert acc["favour"] == {"b": 1, "a": 1, "tie": 1}
    assert loss["differences"] == pytest.approx([-0.1, 0.1, -0.1])
    assert loss["favour"] == {"b": 2, "a": 1, "tie": 0}  # lower is better
    assert loss["mean"] == pytest.approx(-0.1 / 3)
    assert loss["std"] == pytest.approx(math.sqrt((3 * 0.1**2 - 3 * (0.1 / 3) ** 2) / 2))
    assert set(summary["paired"]["b"]) == {"acc", "loss"}  # "before" has no direction
    lines = format_summary([SHOWN, ACCURACY, LOSS], ["a", "b"], [0, 1, 2], summary)
    assert "  b − a  loss: -0.0333 ± 0.1155  (b better in 2, a in 1, tied in 0 of 3)" in lines
