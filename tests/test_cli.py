"""`torchdora` CLI end to end on a tiny random BERT and a tiny CSV (seconds), and its errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from torchdora.cli import _read_config_file, main
from torchdora.quantization import QUANTIZATION_METHODS
from torchdora.recipes import METHODS, TASKS, FinetuneConfig
from torchdora.train.precision import PRECISIONS
from torchdora.train.progress import PROGRESS_MODES

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


def finetune_argv(tiny, out, *extra: str) -> list[str]:
    return [
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
    ]  # fmt: skip


def finetune(tiny, out, *extra: str) -> int:
    return main(finetune_argv(tiny, out, *extra))


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


def test_evaluate_and_predict_without_model_use_the_runs_model(tiny, tmp_path, monkeypatch, capsys):
    """The adapter records the run's model folder, found from any folder though `--model` was
    relative; without `--model` that folder is loaded, not the bundled MiniLM."""
    monkeypatch.chdir(tiny)
    out = tmp_path / "run"
    assert finetune(tiny, out, "--model", "model") == 0
    monkeypatch.chdir(tmp_path)
    adapter = str(out / "adapter")
    data = ["--data", str(tiny / "data.csv"), "--label-column", "topic"]
    assert main(["evaluate", "--model", str(tiny / "model"), "--adapter", adapter, *data]) == 0
    expected = capsys.readouterr().out.splitlines()[-1]
    assert expected.startswith("accuracy ")
    assert main(["evaluate", "--adapter", adapter, *data]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert main(["predict", "--adapter", adapter, "w1 w2"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in {"a", "b", "c"}


def test_config_file_and_flag_override(tiny, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "lora"\nrank = 2\nmax-steps = 3\n')
    out = tmp_path / "run"
    assert finetune(tiny, out, "--config", str(config), "--max-steps", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["steps"] == 2
    assert json.loads((out / "config.json").read_text())["rank"] == 2


def test_finetune_help_describes_every_flag_with_its_allowed_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: each flag's description on one line
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    described = {}  # flag (without --) -> the words after it and its metavar
    for entry in capsys.readouterr().out.split("\n  --")[1:]:
        flag, *words = entry.split()
        described[flag] = words[0 if flag == "overwrite" else 1 :]
    settings = {spec.name.replace("_", "-") for spec in dataclasses.fields(FinetuneConfig)}
    assert set(described) == settings | {"config", "compare", "seeds"}
    assert all(described.values()), [flag for flag, words in described.items() if not words]
    allowed = {
        "task": TASKS,
        "method": METHODS,
        "precision": PRECISIONS,
        "quantize": QUANTIZATION_METHODS,
        "progress": PROGRESS_MODES,
    }
    for flag, values in allowed.items():
        assert all(value in " ".join(described[flag]) for value in values), flag


def test_yaml_config_reads_numbers_with_an_exponent_as_floats(tmp_path):
    """As YAML 1.2 does; PyYAML alone (YAML 1.1) reads `1e-3` as a string."""
    yaml = pytest.importorskip("yaml")
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nmagnitude_lr: 2E+2\nrank: 8\nmodel: '1e-3'\n")
    values = _read_config_file(str(config))
    assert values == {"lr": 0.001, "magnitude_lr": 200.0, "rank": 8, "model": "1e-3"}
    assert type(values["rank"]) is int
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # PyYAML's own loader is unchanged


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("c.toml", 'rank = "8"\n', "rank"),
        ("c.json", '{"rank": 4.5}', "rank"),
        ("c.json", '{"dropout": null}', "dropout"),
        ("c.json", '{"lr": "1e-3"}', "lr"),
        ("c.yaml", 'test_size: "0.2"\n', "test_size"),
        ("c.json", '{"output": 5}', "output"),
        ("c.json", '{"max-steps": "2"}', "max-steps"),  # wrong even where a flag overrides it
    ],
)
def test_config_file_value_of_a_wrong_type_is_one_line_exit_2(
    tiny, tmp_path, capsys, name, text, key
):
    config = tmp_path / name
    config.write_text(text)
    out = tmp_path / "run"
    assert finetune(tiny, out, "--config", str(config)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(config) in err[0] and f"{key} must be" in err[0], err
    assert not out.exists()


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
        (["--lr", "-1"], "lr must be > 0"),
        (["--magnitude-lr", "-1"], "magnitude_lr must be > 0"),
        (["--loraplus-ratio", "0"], "loraplus_ratio must be > 0"),
        (["--targets", "query,foo"], "['foo']"),
        (["--targets", "attention"], "matched modules torchdora cannot adapt"),
        (["--output", ""], "output must be a folder path"),
        (["--train-per-class", "0"], "train_per_class must be a positive integer, got 0"),
        (["--train-per-class", "17"], "label 'a' has only 16 training examples: choose at most 16"),
        (["--task", "causal-lm", "--train-per-class", "4"], "a setting of --task classification"),
        (["--overwrite", "--resume", "somewhere"], "overwrite"),
        (["--unknown-key-file"], None),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    tiny, tmp_path, capsys, monkeypatch, args, message
):
    replacements = {
        "CSV_WITHOUT_COLUMN": lambda: _bad_csv(tmp_path, "text,label\nw1 w2,a\nw3,b\n"),
        "EMPTY_CSV": lambda: _bad_csv(tmp_path, "text,topic\n"),
        "NOT_A_MODEL": lambda: str(tmp_path),
        "HEAD_TOO_SMALL": lambda: str(_two_label_classifier(tiny, tmp_path)),
    }
    args = [replacements[a]() if a in replacements else a for a in args]
    monkeypatch.chdir(tmp_path)  # a run folder "" would be the current folder
    before = set(tmp_path.iterdir())
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
    assert set(tmp_path.iterdir()) == before


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


def test_max_length_beyond_the_model_is_cut_to_its_positions(tiny, tmp_path, capsys):
    long_text = " ".join(WORDS * 3)  # 90 words: more than the model's 64 positions
    data = _bad_csv(
        tmp_path, "text,topic\n" + "".join(f"{long_text},{'abc'[i % 3]}\n" for i in range(30))
    )
    assert finetune(tiny, tmp_path / "run", "--data", data, "--max-length", "100") == 0
    assert "texts are cut to 64 tokens" in capsys.readouterr().out


def test_a_failed_run_removes_what_it_created(tiny, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr("torchdora.recipes.classification.evaluate_classification", broken)
    assert finetune(tiny, tmp_path / "new" / "run") == 2
    assert "evaluation broke" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # an empty folder of the user's stays, empty
    mine.mkdir()
    assert finetune(tiny, mine) == 2
    assert mine.is_dir() and not any(mine.iterdir())


def test_reusing_a_run_folder_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny, out, "--max-steps", "2") == 0
    first = {p.name: p.read_text() for p in out.glob("*.json*")}
    capsys.readouterr()
    assert finetune(tiny, out, "--max-steps", "2", "--method", "lora") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not empty" in err and f"--resume {out / 'checkpoint'}" in err and "--overwrite" in err
    assert {p.name: p.read_text() for p in out.glob("*.json*")} == first

    (out / "notes.txt").write_text("mine")
    assert finetune(tiny, out, "--max-steps", "2", "--method", "lora", "--overwrite") == 0
    records = [json.loads(line) for line in (out / "decomposition.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"LoRA"}  # the DoRA run's records are gone
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == len(first["metrics.jsonl"].splitlines())
    assert (out / "notes.txt").read_text() == "mine"
    assert "overwrite" not in json.loads((out / "config.json").read_text())  # not a setting

    # --resume continues a run there, but not into a file where the run writes a folder
    shutil.rmtree(out / "merged")
    (out / "merged").write_text("x")
    checkpoint = str(out / "checkpoint")
    assert finetune(tiny, out, "--max-steps", "2", "--method", "lora", "--resume", checkpoint) == 2
    assert str(out / "merged") in capsys.readouterr().err.strip().splitlines()[-1]

    blocked = tmp_path / "blocked"  # QA's case: refused up front, not after training
    blocked.mkdir()
    (blocked / "merged").write_text("x")
    assert finetune(tiny, blocked) == 2
    assert [p.name for p in blocked.iterdir()] == ["merged"]


def test_targets_one_name_is_a_list_of_one_and_a_regex_still_works(tiny, tmp_path):
    for targets, suffix in (("query", ".query"), (r".*\.value", ".value")):
        out = tmp_path / suffix.strip(".")
        assert finetune(tiny, out, "--targets", targets, "--max-steps", "1") == 0
        adapted = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapted["target_modules"] and all(
            name.endswith(suffix) for name in adapted["target_modules"]
        )


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


def test_compare_bad_input_is_one_line_exit_2_nothing_written(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, methods, message in (
        (afile, "lora,dora", f"{afile} is a file"),
        (tmp_path / "cmp", ",", "--compare needs at least one method"),
        (tmp_path / "cmp", "dora,lora,dora", "--compare lists dora more than once"),
    ):
        assert finetune(tiny, out, "--compare", methods) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == [afile] and afile.read_text() == "x"


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


def test_dora_without_normalisation_runs_saves_and_evaluates(tiny, tmp_path, capsys):
    out = tmp_path / "no-norm"
    assert finetune(tiny, out, "--method", "dora-no-norm") == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TORCHDORA_DORA_NO_NORM" and config["use_dora"] is True
    records = (out / "decomposition.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["method"] == "DoRA (no norm)"
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy_after"]
    capsys.readouterr()
    assert main(["inspect", str(out / "adapter")]) == 0
    assert "DoRA without normalisation" in capsys.readouterr().out
    args = ["--model", str(tiny / "model"), "--adapter", str(out / "adapter")]
    assert (
        main(["evaluate", *args, "--data", str(tiny / "data.csv"), "--label-column", "topic"]) == 0
    )
    assert capsys.readouterr().out.startswith("accuracy ")
    assert 0.0 <= accuracy <= 1.0


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


def test_commands_reading_a_run_name_bad_input_in_one_line(tiny, tmp_path, capsys):
    """evaluate/predict/inspect/analyze and --resume given bad values or damaged files: one
    line naming the problem, exit 2 (not a traceback)."""
    out = tmp_path / "run"
    assert finetune(tiny, out) == 0
    model, adapter, a_file = str(tiny / "model"), out / "adapter", tmp_path / "a-file"
    a_file.write_text("x")
    predict = ["predict", "--model", model, "--adapter", str(adapter)]

    def fails(argv: list[str], message: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err  # with transformers' progress bar of a model load
        last = err.rstrip("\n").split("\n")[-1]
        assert last.startswith(f"torchdora {argv[0]}: error:") and message in last, err
        assert "Traceback" not in err

    fails([*predict, "--max-length", "-1", "w1"], "max_length must be at least 2, got -1")
    long_text = " ".join(WORDS * 4)  # 120 tokens: past the model's 64 positions
    capsys.readouterr()
    assert main([*predict, "--max-length", "200", long_text]) == 0  # cut to the positions
    assert capsys.readouterr().out.split("\t")[0] in "abc"
    fails(["evaluate", "--model", model, "--adapter", str(adapter), "--max-length", "1"],
          "max_length must be at least 2")  # fmt: skip
    fails(["inspect", str(a_file)], "is a file, not a folder")
    fails(["analyze", str(a_file)], "is a file, not a folder")
    fails(["analyze", str(out), "--out", str(a_file)], "is a file, not a folder")
    fails(["analyze", str(out), "--out", str(a_file / "plots")], "Not a directory")
    fails(["analyze", str(out), "--module-type", "quer"],
          "has no layers of module type 'quer'; its types are query, value: pick one")  # fmt: skip
    fails(["analyze", str(out), "--checkpoints", "0"], "--checkpoints must be a positive integer")
    labels = adapter / "labels.json"
    for text, message in [
        ("null", "must hold a list of at least 2 class names, found None"),
        ('["a", "b"', "labels.json is not valid JSON"),
        ('["a", "b"]', "the classification head is built for the 2 labels in"),
    ]:
        labels.write_text(text)
        fails([*predict, "w1"], message)
    labels.unlink()
    fails([*predict, "w1"], "a causal-lm run's adapter goes with `torchdora generate`")

    weights = out / "checkpoint" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    fails(finetune_argv(tiny, out, "--resume", str(out / "checkpoint")),
          "trainable.safetensors is damaged or unreadable")  # fmt: skip


# A non-default value of every setting, as a flag gives it and as FinetuneConfig holds it.
FLAG_VALUES = {
    "task": ("causal-lm", "causal-lm"),
    "method": ("lora", "lora"),
    "rank": ("4", 4),
    "alpha": ("8", 8.0),
    "dropout": ("0.1", 0.1),
    "targets": ("query,key", ["query", "key"]),
    "model": ("some/model", "some/model"),
    "data": ("d.csv", "d.csv"),
    "text_column": ("body", "body"),
    "label_column": ("topic", "topic"),
    "test_size": ("0.3", 0.3),
    "split_seed": ("7", 7),
    "train_per_class": ("3", 3),
    "max_length": ("64", 64),
    "epochs": ("2", 2),
    "max_steps": ("5", 5),
    "lr": ("0.01", 0.01),
    "magnitude_lr": ("0.02", 0.02),
    "loraplus_ratio": ("4", 4.0),
    "batch_size": ("4", 4),
    "grad_accum": ("2", 2),
    "warmup_ratio": ("0.25", 0.25),
    "max_grad_norm": ("none", None),
    "precision": ("fp32", "fp32"),
    "seed": ("3", 3),
    "eval_steps": ("2", 2),
    "save_steps": ("3", 3),
    "quantize": ("bnb-nf4", "bnb-nf4"),
    "output": ("out", "out"),
    "resume": ("ckpt", "ckpt"),
    "overwrite": (None, True),
    "progress": ("log", "log"),
}
# What each setting is called in TrainingArguments.
TRAINING_NAMES = {
    "epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "lr": "learning_rate",
    "magnitude_lr": "magnitude_lr",
    "loraplus_ratio": "loraplus_lr_ratio",
    "batch_size": "train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "warmup_ratio": "warmup_ratio",
    "max_grad_norm": "max_grad_norm",
    "precision": "precision",
    "seed": "seed",
    "eval_steps": "eval_steps",
    "save_steps": "save_steps",
    "progress": "progress",
}


def test_every_setting_is_a_flag_and_reaches_the_run(monkeypatch, tmp_path):
    """Each field of FinetuneConfig is a flag (--split-seed, --warmup-ratio, --max-grad-norm
    among them) and a config-file key, and arrives in the run's config and TrainingArguments."""
    runs = []
    monkeypatch.setattr("torchdora.cli.run_finetune", runs.append)
    fields = {spec.name: spec.default for spec in dataclasses.fields(FinetuneConfig)}
    assert set(FLAG_VALUES) == set(fields)
    for name, (text, value) in FLAG_VALUES.items():
        assert value != fields[name], name  # a value the default would not give by chance
        flag = ["--" + name.replace("_", "-")] + ([text] if text is not None else [])
        assert main(["finetune", *flag]) == 0, name
        assert getattr(runs[-1], name) == value, name
        config_file = tmp_path / f"{name}.json"
        config_file.write_text(json.dumps({name.replace("_", "-"): value}))
        assert main(["finetune", "--config", str(config_file)]) == 0, name
        assert getattr(runs[-1], name) == value, name
        if name in TRAINING_NAMES:
            assert getattr(runs[-1].training_arguments(), TRAINING_NAMES[name]) == value, name
    assert not set(TRAINING_NAMES) - set(fields)


def test_settings_are_checked_and_named_as_the_user_wrote_them(capsys):
    for flag, message in [
        (["--warmup-ratio", "1.5"], "warmup_ratio must be in [0, 1), got 1.5"),
        (["--max-grad-norm", "0"], "max_grad_norm must be > 0 or None, got 0.0"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--epochs", "0"], "epochs must be a positive integer, got 0"),
        (["--split-seed", "x"], None),  # argparse: not an integer
    ]:
        if message is None:
            with pytest.raises(SystemExit):
                main(["finetune", *flag])
            continue
        assert main(["finetune", *flag]) == 2
        assert capsys.readouterr().err == f"torchdora finetune: error: {message}\n"


def test_split_seed_holds_out_another_split(tiny, tmp_path):
    """--split-seed holds out other examples: with the same seed (the same new head) the loss
    before training differs, and the run records the split seed."""
    before = {}
    for name, extra in [("a", []), ("c", ["--split-seed", "1"])]:
        assert finetune(tiny, tmp_path / name, "--max-steps", "1", *extra) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        config = json.loads((tmp_path / name / "config.json").read_text())
        before[config["split_seed"]] = metrics["loss_before"]
    assert set(before) == {0, 1} and before[0] != before[1]


def test_train_per_class_trains_on_k_per_label_and_keeps_the_held_out_split(tiny, tmp_path, capsys):
    """--train-per-class 4: 12 of the 48 training examples (4 of each of the 3 labels); the
    held-out examples, and with the same seed the new head, are those of the full-data run."""
    runs = {}
    for name, extra in [("all", []), ("few", ["--train-per-class", "4"])]:
        assert finetune(tiny, tmp_path / name, "--max-steps", "1", *extra) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert (runs["all"]["train_examples"], runs["few"]["train_examples"]) == (48, 12)
    for key in ("loss_before", "accuracy_before"):
        assert runs["few"][key] == runs["all"][key], key
    assert json.loads((tmp_path / "few" / "config.json").read_text())["train_per_class"] == 4
    assert "12 train (4 per label) / 12 held-out examples" in capsys.readouterr().out


#: Every line a classification run prints (stdout and stderr) is one of these.
OUR_LINES = [
    r"new classification head \(classifier\) for the 3 labels: randomly initialised, "
    r"trained in full",
    r"DORA r=8 alpha=16 on model: [\d,]+ trainable of [\d,]+ parameters; 48 train / 12 "
    r"held-out examples, 3 labels",
    r"max_length 128 is more than the model reads: texts are cut to 64 tokens",
    r"held-out accuracy (before|after): +[\d.]+ \(loss [\d.]+\)( — 2 steps, [\d.]+ s/step)?",
    r"step \d+/2 \| .*",
    r"wrote .*/adapter \(PEFT format\), .*/merged, metrics.json, config.json",
]


def quiet_by_itself() -> dict[str, str]:
    """The environment without what an earlier in-process ``main()`` set in it."""
    env = dict(os.environ)
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    return env


def foreign_lines(output: str, ours: list[str]) -> list[str]:
    lines = output.removesuffix("\n").split("\n")
    return [line for line in lines if not any(re.fullmatch(p, line) for p in ours)]


def test_a_run_prints_our_lines_only(tiny, tmp_path):
    """No load report of transformers (the new head is announced in our words), no progress
    bars of its model loading or saving: the progress lines, the numbers, where the run went."""
    result = subprocess.run(
        [sys.executable, "-m", "torchdora", *finetune_argv(tiny, tmp_path / "run"),
         "--max-steps", "2", "--progress", "log"],
        capture_output=True, text=True, timeout=300, env=quiet_by_itself(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert foreign_lines(result.stdout + result.stderr, OUR_LINES) == []
    assert len(result.stdout.splitlines()) == 6 and "new classification head" in result.stdout
