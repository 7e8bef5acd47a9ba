"""The benchmark scripts run end to end on a tiny grid. Nothing here asserts anything about time:
timings belong in ``benchmarks/RESULTS.md``, never in the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--shapes=48x32", "--tokens=8", "--ranks=4", "--reps=2", "--warmup=1"]
NO_WAITING = ["--max-other-load=1", "--patience=0"]  # a busy test machine is no reason to wait


def run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, *NO_WAITING, f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_layer_step_times_every_variant(tmp_path):
    variants = "lora,dora,frozen,dora-detached"
    try:
        import peft  # noqa: F401

        variants += ",peft-lora,peft-dora"
    except ImportError:
        pass
    payload = run(
        "layer_step.py", *TINY, "--dtypes=fp32,bf16", f"--variants={variants}", "--no-memory",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert payload["machine"]["torch_threads"] == 2
    assert len(payload["results"]) == 2
    for result in payload["results"]:
        assert set(result["median_s"]) == set(variants.split(","))
        assert all(len(s) == 2 for s in result["samples_s"].values())


def test_layer_step_measures_peak_memory(tmp_path):
    payload = run(
        "layer_step.py", *TINY, "--dtypes=fp32", "--variants=lora,dora", "--optimizer",
        "--keep-freed-memory", tmp_path=tmp_path,
    )  # fmt: skip
    assert payload["machine"]["freed memory"].startswith("kept")
    peaks = payload["results"][0]["peak_mib"]
    assert set(peaks) == {"lora", "dora"}
    assert all(peak >= 0 for peak in peaks.values())


def test_inference_and_stack_rule(tmp_path):
    variants = "--variants=lora,dora,dora-first,dora-merged,base"
    payload = run("inference.py", *TINY, "--dtypes=fp32", variants, tmp_path=tmp_path)
    assert set(payload["results"][0]["median_s"]) == set(variants.split("=")[1].split(","))
    payload = run("stack_rule.py", *TINY, "--dtypes=fp32,bf16", tmp_path=tmp_path)
    assert {r["rule"] for r in payload["results"]} <= {"stacked", "separate"}


def test_ab_against_a_baseline_checkout(tmp_path):
    root = str(BENCHMARKS.parent)  # this checkout against itself
    args = ["--layer=8,32,48", "--rank=4", "--reps=2", "--warmup=1"]
    payload = run("ab.py", f"--baseline={root}", *args, tmp_path=tmp_path)
    result = payload["results"][0]
    assert set(result["median_s"]) == {"lora", "baseline", "dora"}
    assert set(result["paired_ratio"]) == {"baseline/lora", "dora/lora", "dora/baseline"}
    assert payload["machine"]["freed memory"].startswith("returned")

    args = ["--baseline", str(tmp_path), "--layer=8,32,48", "--json=x"]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "ab.py"), *args], capture_output=True)
    assert proc.returncode == 2 and b"has no src/torchdora" in proc.stderr


def test_model_step_on_a_one_layer_llama(tmp_path):
    args = ["--models=llama", "--layers=1", "--reps=2", "--warmup=1", "--no-memory"]
    result = run("model_step.py", *args, tmp_path=tmp_path)["results"][0]
    assert result["adapted_layers"] == 7  # q, k, v, o, gate, up, down
    assert set(result["median_s"]) == {"lora", "dora"}


def test_cuda_path_skips_cleanly_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU path runs for real in benchmarks, not here")
    for script, args in [
        ("layer_step.py", TINY),
        ("inference.py", TINY),
        ("model_step.py", ["--models=llama"]),
    ]:
        proc = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), *args, "--device=cuda"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, script
        assert "CUDA is not available" in proc.stdout, script


def test_mixed_batch_times_every_variant(tmp_path):
    args = ["--models=llama", "--layers=1", "--adapters=2", "--rows=2", "--length=2", "--rank=2"]
    payload = run(
        "mixed_batch.py", *args, "--reps=2", "--warmup=1", "--no-memory", tmp_path=tmp_path
    )
    assert set(payload["results"][0]["median_s"]) == {"single", "mixed", "separate", "merged"}


PEFT_CLIENT = ["--dtypes=bf16", "--steps=2", "--warmup=1", "--rounds=1"]


def test_peft_client_times_each_variant_in_the_real_trainer(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    variants = "peft-dora,accelerated,apply_dora"
    args = ["--tasks=sft", f"--variants={variants}", *PEFT_CLIENT]
    result = run("peft_client.py", *args, tmp_path=tmp_path)["results"][0]
    assert set(result["median_step_s"]) == set(variants.split(","))
    assert set(result["paired_ratio"]) == {"accelerated/PEFT-DoRA", "apply_dora/PEFT-DoRA"}
    runs = {v: r[0] for v, r in result["runs"].items()}
    assert all(len(r["steps_s"]) == 2 and r["peak_rss_mib"] > 0 for r in runs.values())
    assert len({r["trainable"] for r in runs.values()}) == 1  # the same adapters in each


def test_peft_client_alternates_one_trainer_between_peft_and_accelerated(tmp_path):
    pytest.importorskip("trl")
    args = ["--alternate", "--tasks=sft", "--dtypes=fp32", "--steps=5", "--warmup=1", "--rounds=1"]
    result = run("peft_client.py", *args, tmp_path=tmp_path)["results"][0]
    (child,) = result["runs"]["alternating"]
    assert child["accelerated_steps"] == [False, True, False, True, False]
    assert result["pair_ratios"] == [child["pair_ratio"]] and child["pair_ratio"] > 0


@pytest.mark.slow
def test_peft_client_classification_through_trainer(tmp_path):
    pytest.importorskip("trl")
    result = run("peft_client.py", "--tasks=classify", *PEFT_CLIENT, tmp_path=tmp_path)
    assert set(result["results"][0]["paired_ratio"]) == {
        "accelerated/PEFT-DoRA", "apply_dora/PEFT-DoRA", "PEFT-DoRA/PEFT-LoRA"
    }  # fmt: skip


def test_peft_client_names_bad_input_in_one_line():
    script = str(BENCHMARKS / "peft_client.py")
    proc = subprocess.run(
        [sys.executable, script, "--variants=peft-dora,qlora"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(
        "--variants: unknown qlora; choose from peft-lora, peft-dora, accelerated, apply_dora"
    )


def test_peft_layer_races_the_accelerated_layer(tmp_path):
    pytest.importorskip("peft")
    payload = run("peft_layer.py", *TINY, "--dtypes=fp32", "--no-memory", tmp_path=tmp_path)
    variants = {"lora", "peft-lora", "peft-dora", "peft-accel", "dora"}
    assert set(payload["results"][0]["median_s"]) == variants


@pytest.mark.slow
def test_layer_step_measures_the_accelerated_layer_s_memory(tmp_path):
    pytest.importorskip("peft")
    args = [*TINY, "--dtypes=fp32", "--variants=lora,peft-accel", "--memory-only"]
    peaks = run("layer_step.py", *args, tmp_path=tmp_path)["results"][0]["peak_mib"]
    assert set(peaks) == {"lora", "peft-accel"}


@pytest.mark.slow
def test_qdora_step_races_peft_qdora():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    args = ["--peft", "--d=64", "--tokens=8", "--rank=4", "--reps=2", "--warmup=1", *NO_WAITING]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "qdora_step.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("|")}
    assert {"qdora", "qlora", "peft-qdora", "peft-accel"} <= rows
    assert "accelerated / PEFT QDoRA step time" in proc.stdout
