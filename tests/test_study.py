"""``examples/study.py`` end to end on the tiny BERT and LLaMA of the CLI tests: every part runs,
the kept files are the runs' own, and the printed tables are the compare.json numbers. Nothing
here asserts anything about the study's results: those belong in ``docs/RESULTS.md``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_causal_lm
import test_cli

STUDY = Path(__file__).resolve().parent.parent / "examples" / "study.py"
tiny = test_cli.tiny  # the random-BERT folder and 3-label CSV


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return test_causal_lm.build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def study(tiny, tiny_lm, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "--output", str(tmp_path / "runs"),
        "--keep", str(tmp_path / "kept"),
        "--methods", "dora,lora",
        "--seeds", "0,1",
        "--ranks", "4",
        "--max-steps", "2",
        "--low-data-seeds", "0,1",
        "--low-data-ranks", "1",
        "--train-per-class", "4",
        "--lm-ranks", "2",
        "--lm-max-steps", "2",
        "--lm-max-length", "32",
        "--model", str(tiny / "model"),
        "--data", str(tiny / "data.csv"),
        "--label-column", "topic",
        "--lm-model", str(tiny_lm / "model"),
        "--lm-data", str(tiny_lm / "pairs.jsonl"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(STUDY), *args], capture_output=True, text=True, timeout=900
    )


def check_compared(proc, kept, name: str, task: str, train_examples: int | None) -> None:
    """``KEEP/NAME``: dora and lora at seeds 0 and 1, each run's own metrics.json and
    config.json kept, and the printed tables holding compare.json's numbers."""
    report = json.loads((kept / name / "compare.json").read_text())
    assert (report["task"], report["methods"], report["seeds"]) == (task, ["dora", "lora"], [0, 1])
    for run in report["runs"]:
        folder = kept / name / run["method"] / f"seed{run['seed']}"
        assert json.loads((folder / "metrics.json").read_text()) == run["metrics"]
        config = json.loads((folder / "config.json").read_text())
        assert (config["method"], config["seed"]) == (run["method"], run["seed"])
        assert run["metrics"].get("train_examples") == train_examples
    mean = report["per_method"]["lora"]["loss_after"]
    assert f"{mean['mean']:.4f} ± {mean['std']:.4f}" in proc.stdout
    pair = report["paired"]["lora"]["loss_after"]
    dora_better = pair["favour"]["dora"]
    assert f"{pair['mean']:+.4f} ± {pair['std']:.4f} (dora better in {dora_better}/2)" in (
        proc.stdout
    )


def test_ablation_and_figure2_parts_keep_the_runs_files(tiny, tiny_lm, tmp_path):
    proc = study(tiny, tiny_lm, tmp_path, "--parts", "ablation,figure2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kept = tmp_path / "kept"
    record = json.loads((kept / "study.json").read_text())
    assert set(record) == {"ablation-r4", "ablation-full", "figure2/seed0", "figure2/seed1"}
    assert all(f"$ {entry['command']}" in proc.stdout for entry in record.values())
    check_compared(proc, kept, "ablation-r4", "classification", 48)
    assert json.loads((kept / "ablation-full" / "compare.json").read_text())["methods"] == ["full"]

    for seed in (0, 1):
        figure2 = json.loads((kept / "figure2" / f"seed{seed}" / "figure2.json").read_text())
        assert set(figure2["methods"]) == {"FT", "LoRA", "DoRA"}
        assert f"{figure2['methods']['DoRA']['slope']:+.3g}" in proc.stdout
        assert (kept / "ablation-r4" / "dora" / f"seed{seed}" / "decomposition.jsonl").is_file()
    assert (kept / "figure2" / "seed0" / "decomposition.png").is_file()
    assert not (kept / "figure2" / "seed1" / "decomposition.png").exists()  # one plot is enough

    again = study(tiny, tiny_lm, tmp_path, "--parts", "ablation,figure2")
    assert again.returncode == 0 and "$ torchdora finetune" not in again.stdout  # read back
    assert json.loads((kept / "study.json").read_text())["ablation-r4"] == record["ablation-r4"]


@pytest.mark.slow
def test_every_part(tiny, tiny_lm, tmp_path):
    proc = study(tiny, tiny_lm, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kept = tmp_path / "kept"
    assert set(json.loads((kept / "study.json").read_text())) == {
        "ablation-r4", "ablation-full", "low-data-r1", "magnitude-lr-r1", "causal-r2",
        "figure2/seed0", "figure2/seed1",
    }  # fmt: skip
    check_compared(proc, kept, "low-data-r1", "classification", 12)
    check_compared(proc, kept, "magnitude-lr-r1", "classification", 12)
    check_compared(proc, kept, "causal-r2", "causal-lm", None)
    for run in json.loads((kept / "magnitude-lr-r1" / "compare.json").read_text())["runs"]:
        folder = kept / "magnitude-lr-r1" / run["method"] / f"seed{run['seed']}"
        config = json.loads((folder / "config.json").read_text())
        assert (config["magnitude_lr"], config["train_per_class"], config["rank"]) == (0.003, 4, 1)


def test_unknown_part_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(STUDY), "--output", "o", "--keep", "k", "--parts", "ablation,fig"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr == "study.py: error: --parts fig: the parts are " + (
        "ablation,low-data,magnitude-lr,causal,figure2\n"
    )
    assert list(tmp_path.iterdir()) == []
