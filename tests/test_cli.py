"""`torchdora` CLI end to end on a tiny random BERT and a tiny CSV (seconds), and its errors."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from torchdora.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight BERT folder with a word-level tokenizer, and a 3-class CSV."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "topic"])
        for i in range(60):
            label = i % 3
            words = [WORDS[rng.randrange(label * 10, label * 10 + 10)] for _ in range(6)]
            writer.writerow([" ".join(words), "abc"[label]])
    return root


def finetune(tiny, out, *extra: str) -> int:
    return main(
        [
            "finetune",
            "--model", str(tiny / "model"),
            "--data", str(tiny / "data.csv"),
            "--label-column", "topic",
            "--max-steps", "6",
            "--batch-size", "8",
            "--lr", "0.01",
            "--progress", "none",
            "--output", str(out),
            *extra,
        ]
    )  # fmt: skip


def test_finetune_writes_a_complete_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny, out, "--rank", "4") == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy before" in printed and "held-out accuracy after" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["method"] == "dora"
    assert metrics["label_names"] == ["a", "b", "c"]
    config = json.loads((out / "config.json").read_text())
    assert config["rank"] == 4 and config["label_column"] == "topic"
    assert (out / "checkpoint").is_dir() and (out / "decomposition.jsonl").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2

    # The adapter is PEFT's format: PEFT loads it on the base model and agrees with the
    # merged export, which loads with transformers alone.
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=3
    )
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    with torch.no_grad():
        expected = merged.eval()(input_ids=ids).logits
        assert torch.allclose(theirs(input_ids=ids).logits, expected, atol=1e-5)


def test_evaluate_predict_inspect_analyze(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny, out) == 0
    capsys.readouterr()
    model = str(tiny / "model")
    adapter = str(out / "adapter")
    assert main(["evaluate", "--model", model, "--adapter", adapter,
                 "--data", str(tiny / "data.csv"), "--label-column", "topic"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("accuracy ")
    assert main(["predict", "--model", str(out / "merged"), "w1 w2", "w25 w26"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in "abc" for line in lines)
    assert main(["inspect", adapter]) == 0
    assert "DoRA" in capsys.readouterr().out
    assert main(["analyze", str(out)]) == 0
    assert (out / "decomposition.png").is_file() and (out / "loss.png").is_file()


def test_config_file_and_flag_override(tiny, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "lora"\nrank = 2\nmax-steps = 3\n')
    out = tmp_path / "run"
    assert finetune(tiny, out, "--config", str(config), "--max-steps", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["steps"] == 2
    assert json.loads((out / "config.json").read_text())["rank"] == 2


def _bad_csv(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "rank must be a positive integer"),
        (["--method", "adalora"], "method must be one of"),
        (["--data", "missing.csv"], "not found"),
        (["--data", "CSV_WITHOUT_COLUMN"], "topic"),
        (["--data", "EMPTY_CSV"], "no"),
        (["--model", "NOT_A_MODEL"], "not a transformers model folder"),
        (["--model", "HEAD_TOO_SMALL"], "labels"),
        (["--config", "missing.toml"], "does not exist"),
        (["--quantize", "int3"], "quantize must be one of"),
        (["--method", "full", "--quantize", "bnb-nf4"], "trains the base weights"),
        (["--unknown-key-file"], None),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, args, message):
    replacements = {
        "CSV_WITHOUT_COLUMN": lambda: _bad_csv(tmp_path, "text,label\nw1 w2,a\nw3,b\n"),
        "EMPTY_CSV": lambda: _bad_csv(tmp_path, "text,topic\n"),
        "NOT_A_MODEL": lambda: str(tmp_path),
        "HEAD_TOO_SMALL": lambda: str(_two_label_classifier(tiny, tmp_path)),
    }
    args = [replacements[a]() if a in replacements else a for a in args]
    capsys.readouterr()
    out = tmp_path / "run"
    if message is None:  # argparse's own error for an unknown flag
        with pytest.raises(SystemExit) as exit_info:
            finetune(tiny, out, *args)
        assert exit_info.value.code == 2
    else:
        assert finetune(tiny, out, *args) == 2
        # the error is the last line (transformers may log while loading the model before it)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("torchdora finetune: error:")
        assert message in err
    assert not out.exists()


def _two_label_classifier(tiny, tmp_path):
    path = tmp_path / "two_labels"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=2
    )
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(path)
    return path


def test_unwritable_output_fails_before_training(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert finetune(tiny, blocker / "run") == 2
    assert "not writable" in capsys.readouterr().err


def test_compare_trains_both_methods(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert finetune(tiny, out, "--compare", "lora,dora", "--max-steps", "2") == 0
    printed = capsys.readouterr().out
    assert "method" in printed and "peak MB" in printed
    for method in ("lora", "dora"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["steps"] == 2
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    dora = json.loads((out / "dora" / "metrics.json").read_text())
    assert dora["trainable_parameters"] > lora["trainable_parameters"]  # + the magnitudes
    # same seed: the same new head, and both adapters start as the identity
    assert dora["accuracy_before"] == lora["accuracy_before"]
    assert abs(dora["loss_before"] - lora["loss_before"]) < 1e-5


def test_full_finetune_trains_only_the_targets_and_head(tiny, tmp_path, capsys):
    out = tmp_path / "full"
    assert finetune(tiny, out, "--method", "full") == 0
    assert not (out / "adapter").exists()  # no adapter: the run's model is merged/
    before = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=3
    ).state_dict()
    after = transformers.AutoModelForSequenceClassification.from_pretrained(
        out / "merged"
    ).state_dict()
    changed = {k for k in before if not k.startswith("classifier") and
               not torch.equal(before[k], after[k])}  # fmt: skip
    assert changed and all(".query." in k or ".value." in k for k in changed)
    records = [json.loads(line) for line in (out / "decomposition.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"FT"}
    assert sorted(records[-1]["layers"]) == sorted(
        k.removesuffix(".weight") for k in changed if k.endswith(".weight")
    )


def test_dora_with_frozen_magnitude_keeps_the_initial_norms(tiny, tmp_path):
    out = tmp_path / "frozen"
    assert finetune(tiny, out, "--method", "dora-frozen-magnitude") == 0
    base = transformers.BertModel.from_pretrained(tiny / "model").state_dict()
    adapter = safetensors.torch.load_file(out / "adapter" / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in adapter.items() if k.endswith("lora_magnitude_vector")}
    assert magnitudes
    for key, magnitude in magnitudes.items():
        module = key.removeprefix("base_model.model.bert.").removesuffix(".lora_magnitude_vector")
        expected = base[module + ".weight"].double().norm(dim=1)
        torch.testing.assert_close(magnitude.double(), expected, rtol=1e-6, atol=0)
    records = (out / "decomposition.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["method"] == "DoRA (frozen m)"


def test_qdora_run_with_quantized_base(tiny, tmp_path):
    out = tmp_path / "run"
    assert finetune(tiny, out, "--quantize", "bnb-nf4", "--max-steps", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    # the merged export is a plain float model that transformers loads
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())


def _no_dropout_copy(tiny, folder: Path) -> Path:
    """The tiny model without dropout, so that runs splitting a batch differently agree."""
    model = transformers.BertModel.from_pretrained(
        tiny / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(folder)
    return folder


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_torchrun_ddp_equals_one_process_on_the_global_batch(tiny, tmp_path):
    """2 ranks × 4 examples (DDP, gloo) train the adapter one process trains with 8."""
    settings = [
        "finetune",
        "--model", str(_no_dropout_copy(tiny, tmp_path / "model")),
        "--data", str(tiny / "data.csv"),
        "--label-column", "topic",
        "--max-steps", "4",
        "--lr", "0.01",
        "--precision", "fp32",
        "--seed", "3",
        "--progress", "log",
    ]  # fmt: skip
    assert main([*settings, "--batch-size", "8", "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    two = ["--batch-size", "4", "--output", str(tmp_path / "two")]
    result = subprocess.run(
        [*torchrun, "-m", "torchdora", *settings, *two],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("held-out accuracy after") == 1  # rank 0 alone reports

    def run(name: str) -> tuple[dict, list[float]]:
        folder = tmp_path / name
        tensors = safetensors.torch.load_file(folder / "adapter" / "adapter_model.safetensors")
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return tensors, [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    (one, one_losses), (two, two_losses) = run("one"), run("two")
    assert one.keys() == two.keys() and len(one_losses) == len(two_losses) >= 1
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
