"""Trainer faults: SIGINT/SIGTERM mid-run (in process and in a real subprocess), a second
signal during the save, a save killed between its renames, disk full and permission denied on
the checkpoint/output folder. Resumed runs must equal uninterrupted ones bit for bit."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_cli
import torch
from safetensors.torch import load_file
from test_train_loop import make_examples, make_model, resume_run_args, trainable

from torchdora.train import CheckpointError, Trainer, load_checkpoint
from torchdora.train import checkpoint as checkpoint_module
from torchdora.train.trainer import TrainingInterrupted

SIGNALS = [signal.SIGINT, signal.SIGTERM]
tiny = test_cli.tiny  # the random-BERT folder and CSV of the CLI tests


class UnhandledSignal(Exception):
    pass


@pytest.fixture(autouse=True)
def fallback_handlers() -> Iterator[None]:
    """While a test runs, a signal the Trainer does not catch fails the test instead of
    killing pytest; after ``train`` these handlers must be back in place."""

    def fallback(signum, frame):
        raise UnhandledSignal(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, fallback) for sig in SIGNALS}
    yield
    for sig, old in previous.items():
        assert signal.getsignal(sig) is fallback, "the Trainer did not restore the handler"
        signal.signal(sig, old)


def signal_at(step: int, signum: int):
    """A callback that sends ``signum`` to this process at log record ``step``."""

    def callback(record: dict) -> None:
        if record["step"] == step and "loss" in record:
            os.kill(os.getpid(), signum)

    return callback


def straight_run(tmp_path: Path) -> dict[str, torch.Tensor]:
    model = make_model(dropout=0.2)
    Trainer(model, resume_run_args(tmp_path / "straight"), make_examples(22)).train()
    return trainable(model)


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


# --------------------------------------------------------------------------- signals, in process
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_saves_the_last_step_and_resume_is_bitwise(tmp_path, signum):
    """A signal at step 5 (save_steps 4): the step finishes, a checkpoint of step 5 is
    written, TrainingInterrupted says where; resuming equals a run that never stopped."""
    examples = make_examples(22)
    args = resume_run_args(tmp_path / "ckpt", save_steps=4)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(make_model(dropout=0.2), args, examples, callbacks=[signal_at(5, signum)]).train()
    err = info.value
    assert (err.signum, err.step, err.checkpoint) == (signum, 5, tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in str(err) and signal.Signals(signum).name in str(err)
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["step"] == 5

    torch.manual_seed(99)  # whatever the RNG is now, the checkpoint restores it
    model = make_model(dropout=0.2)
    assert Trainer(model, args, examples).train(tmp_path / "ckpt")["step"] == 10
    assert_bitwise(trainable(model), straight_run(tmp_path))


def test_signal_on_a_save_step_saves_once_and_without_checkpoint_dir_says_so(tmp_path, monkeypatch):
    saves = []
    real_save = Trainer.save_checkpoint
    monkeypatch.setattr(
        Trainer, "save_checkpoint", lambda self, d: saves.append(self.step) or real_save(self, d)
    )
    args = resume_run_args(tmp_path / "c", save_steps=2)
    with pytest.raises(TrainingInterrupted):
        Trainer(
            make_model(), args, make_examples(22), callbacks=[signal_at(4, signal.SIGINT)]
        ).train()
    assert saves == [2, 4]

    args = resume_run_args(tmp_path / "unused")
    args.checkpoint_dir = None
    with pytest.raises(TrainingInterrupted, match="no checkpoint was saved") as info:
        Trainer(
            make_model(), args, make_examples(22), callbacks=[signal_at(2, signal.SIGTERM)]
        ).train()
    assert info.value.checkpoint is None and info.value.step == 2


def test_signal_in_the_last_step_then_resume_just_evaluates(tmp_path):
    examples = make_examples(22)
    args = resume_run_args(tmp_path / "ckpt")
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(make_model(), args, examples, callbacks=[signal_at(10, signal.SIGINT)]).train()
    assert info.value.step == 10

    def eval_fn(model):
        return {"eval_x": 1.0}

    resumed = Trainer(make_model(), args, examples, eval_fn=eval_fn)
    assert resumed.train(tmp_path / "ckpt") == {
        "step": 10, "train_runtime_s": pytest.approx(0, abs=5), "time_per_step_s": 0.0,
        "train_tokens_per_s": 0.0, "eval_x": 1.0,
    }  # fmt: skip


def test_second_signal_during_the_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The first signal asks for a checkpoint of step 5; a second one lands while it is being
    written: training stops at once, and the checkpoint of step 4 is still complete."""
    examples = make_examples(22)
    args = resume_run_args(tmp_path / "ckpt", save_steps=4)
    real_save_file, calls = checkpoint_module.save_file, []

    def save_file_then_signal(tensors, path):
        calls.append(path)
        real_save_file(tensors, path)
        if len(calls) == 2:  # mid-way through the interrupt's save
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file_then_signal)
    model = make_model(dropout=0.2)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(model, args, examples, callbacks=[signal_at(5, signal.SIGTERM)]).train()
    assert info.value.checkpoint == tmp_path / "ckpt" and len(calls) == 2
    fresh = make_model(dropout=0.2)
    assert load_checkpoint(tmp_path / "ckpt", fresh)["step"] == 4

    monkeypatch.undo()
    model = make_model(dropout=0.2)
    Trainer(model, args, examples).train(tmp_path / "ckpt")
    assert_bitwise(trainable(model), straight_run(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "straight"]  # staging gone


def test_save_killed_between_renames_is_recovered(tmp_path):
    """A kill after moving the previous checkpoint aside and before renaming the new one in
    leaves ``ckpt.old`` (and ``ckpt.tmp``): the next load or save puts the previous one back."""
    examples = make_examples(22)
    Trainer(make_model(), resume_run_args(tmp_path / "ckpt", max_steps=2), examples).train()
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    (tmp_path / "ckpt.tmp").mkdir()
    (tmp_path / "ckpt.tmp" / "trainable.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path / "ckpt", make_model())["step"] == 2
    assert not (tmp_path / "ckpt.old").exists()


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("trainable.safetensors", lambda data: data[:50]),
        ("training_state.pt", lambda data: data[: len(data) // 2]),
        ("trainer_state.json", lambda data: data[:-5]),
        ("trainer_state.json", lambda data: b"[1, 2]"),
    ],
)
def test_damaged_checkpoint_file_is_named_and_the_model_left_alone(tmp_path, name, damage):
    examples = make_examples(22)
    Trainer(make_model(), resume_run_args(tmp_path / "ckpt", max_steps=2), examples).train()
    path = tmp_path / "ckpt" / name
    path.write_bytes(damage(path.read_bytes()))
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{name} is damaged or unreadable"):
        load_checkpoint(tmp_path / "ckpt", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_of_other_optimizer_groups_is_refused_and_the_model_left_alone(tmp_path):
    examples = make_examples(22)
    Trainer(make_model(), resume_run_args(tmp_path / "ckpt", max_steps=2), examples).train()
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_group = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(CheckpointError, match="saved with other parameter groups"):
        load_checkpoint(tmp_path / "ckpt", model, one_group)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_outside_the_main_thread_no_handler_is_installed(tmp_path):
    seen = []

    def run() -> None:
        args = resume_run_args(tmp_path / "c", max_steps=2)
        seen.append(Trainer(make_model(), args, make_examples(22)).train()["step"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert seen == [2]


# --------------------------------------------------------------------------- folder faults
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    for target in ("save_file", "torch_save"):
        folder = tmp_path / target / "ckpt"
        examples = make_examples(22)
        model = make_model()
        trainer = Trainer(model, resume_run_args(folder, max_steps=4, save_steps=2), examples)
        real = {"save_file": checkpoint_module.save_file, "torch_save": torch.save}[target]
        calls = []

        def full(*args, real=real, calls=calls, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        with monkeypatch.context() as patch:
            if target == "save_file":
                patch.setattr(checkpoint_module, "save_file", full)
            else:
                patch.setattr(checkpoint_module.torch, "save", full)
            with pytest.raises(CheckpointError, match="No space left on device") as info:
                trainer.train()
        assert "of step 4" in str(info.value) and "previous checkpoint" in str(info.value)
        assert sorted(p.name for p in folder.parent.iterdir()) == ["ckpt"]  # no staging left
        at_2 = make_model()
        assert load_checkpoint(folder, at_2)["step"] == 2


def test_no_room_for_a_checkpoint_fails_before_the_first_step(tmp_path, monkeypatch):
    usage = checkpoint_module.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    model = make_model()
    before = trainable(model)
    trainer = Trainer(model, resume_run_args(tmp_path / "c"), make_examples(22))
    with pytest.raises(CheckpointError, match=r"not enough disk space .* MiB free"):
        trainer.train()
    assert trainer.step == 0
    assert_bitwise(trainable(model), before)


def test_unwritable_checkpoint_folder_fails_before_the_first_step(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    trainer = Trainer(make_model(), resume_run_args(tmp_path / "file" / "c"), make_examples(22))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*file/c"):
        trainer.train()
    assert trainer.step == 0

    def denied(*args, **kwargs):  # tests run as root, where chmod does not deny anything
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    trainer = Trainer(make_model(), resume_run_args(tmp_path / "c"), make_examples(22))
    with pytest.raises(CheckpointError, match="Permission denied"):
        trainer.train()
    assert trainer.step == 0


# --------------------------------------------------------------------------- the CLI
FLAGS = ["--max-steps", "24", "--save-steps", "10", "--seed", "5"]


@pytest.fixture(scope="module")
def straight_adapter(tiny, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "run"
    torch.manual_seed(0)  # the same global RNG state for every in-process run
    assert test_cli.finetune(tiny, out, *FLAGS) == 0
    return load_file(out / "adapter" / "adapter_model.safetensors")


def cli_errors(stderr: str) -> list[str]:
    """Our lines on stderr (transformers prints its loading progress there too)."""
    return [line for line in stderr.splitlines() if line.startswith("torchdora")]


def resume_and_compare(tiny, out: Path, straight: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)  # irrelevant to the result: the checkpoint holds the initial values
    assert test_cli.finetune(tiny, out, *FLAGS, "--resume", str(out / "checkpoint")) == 0
    assert_bitwise(load_file(out / "adapter" / "adapter_model.safetensors"), straight)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_cli_signal_exit_code_message_and_resume(
    tiny, tmp_path, capsys, monkeypatch, signum, straight_adapter
):
    real_step = Trainer.optimizer_step

    def step_then_signal(self):
        norm = real_step(self)
        if self.step == 6:  # the 7th step is running; the counter moves after this returns
            os.kill(os.getpid(), signum)
        return norm

    monkeypatch.setattr(Trainer, "optimizer_step", step_then_signal)
    out = tmp_path / "run"
    torch.manual_seed(0)
    assert test_cli.finetune(tiny, out, *FLAGS) == 128 + signum
    lines = cli_errors(capsys.readouterr().err)
    name = signal.Signals(signum).name
    assert lines == [
        f"torchdora finetune: interrupted by {name} after step 7; checkpoint in "
        f"{out / 'checkpoint'}: rerun the same command with --resume {out / 'checkpoint'}"
    ]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 7
    assert not (out / "adapter").exists()
    monkeypatch.undo()
    resume_and_compare(tiny, out, straight_adapter)


def test_cli_output_faults_are_one_line_errors(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    assert test_cli.finetune(tiny, tmp_path / "file" / "run") == 2
    err = cli_errors(capsys.readouterr().err)
    assert len(err) == 1 and "is not writable" in err[0]

    real, calls = checkpoint_module.save_file, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    assert test_cli.finetune(tiny, tmp_path / "run", "--save-steps", "3") == 2
    err = cli_errors(capsys.readouterr().err)
    assert len(err) == 1 and "No space left on device" in err[0] and "step 6" in err[0], err
    # the failed run removes nothing a --resume needs: the step-3 checkpoint and its logs stay
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert kept == ["checkpoint", "decomposition.jsonl", "metrics.jsonl"]


def interrupt_comparison(tiny, out: Path, signum: int, *flags: str) -> tuple[int, str]:
    """Run ``torchdora finetune FLAGS`` (a comparison) in a process of its own, send it
    ``signum`` at the first log line of its first run; its exit status and standard error."""
    cmd = [sys.executable, "-m", "torchdora", "finetune", *flags,
           "--model", str(tiny / "model"), "--data", str(tiny / "data.csv"),
           "--label-column", "topic", "--batch-size", "8", "--max-steps", "3000",
           "--progress", "log", "--output", str(out)]  # fmt: skip
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in parent.stderr:
            if line.startswith("step "):
                parent.send_signal(signum)
                break
        _, err = parent.communicate(timeout=120)
    finally:
        parent.kill()
    return parent.returncode, err


def test_cli_compare_interrupted_exits_130_with_a_hint_for_the_compare(tiny, tmp_path):
    """Ctrl-C reaches only the ``--compare`` process (its runs have a process group of their
    own): it passes the signal on once, the running method checkpoints, and it exits 130."""
    out = tmp_path / "cmp"
    returncode, err = interrupt_comparison(tiny, out, signal.SIGINT, "--compare", "lora,dora")
    assert returncode == 130, err
    checkpoint = out / "lora" / "checkpoint"
    [line] = cli_errors(err)
    assert line.startswith(
        "torchdora finetune: interrupted by SIGINT during the lora run of --compare; "
    )
    assert f"--method lora --output {out / 'lora'} --resume {checkpoint} in place of" in line
    assert (checkpoint / "trainer_state.json").is_file() and not (out / "dora").exists()


def test_cli_seeds_study_interrupted_names_the_seed_run_to_finish(tiny, tmp_path):
    """The same with ``--seeds``: SIGTERM, exit 143, and the hint names that run's seed and
    folder; no run after it was started."""
    out = tmp_path / "study"
    flags = ("--compare", "lora,dora", "--seeds", "4,5")
    returncode, err = interrupt_comparison(tiny, out, signal.SIGTERM, *flags)
    assert returncode == 143, err
    run = out / "lora" / "seed4"  # the first run: lora at seed 4
    [line] = cli_errors(err)
    assert line.startswith(
        "torchdora finetune: interrupted by SIGTERM during the lora run (seed 4) of --compare; "
    )
    assert (
        f"--method lora --seed 4 --output {run} --resume {run / 'checkpoint'} in place of "
        "--compare, --seeds and --output" in line
    )
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["training_arguments"]["seed"] == 4  # the run got its seed
    assert sorted(p.name for p in out.iterdir()) == ["lora"] and not (out / "compare.json").exists()


CHILD = """
import sys, time
import torch
from torchdora.cli import main
from torchdora.train import Trainer

real_step = Trainer.optimizer_step

def slow_step(self):  # slow enough for the parent to signal mid-run; numerics unchanged
    norm = real_step(self)
    print("step", self.step + 1, flush=True)
    time.sleep(0.1)
    return norm

if sys.argv.pop(1) == "slow":
    Trainer.optimizer_step = slow_step
torch.manual_seed(0)
sys.exit(main(sys.argv[1:]))
"""


def cli_child(tiny, out: Path, mode: str) -> subprocess.Popen:
    """``torchdora finetune`` in a fresh process; ``mode`` ``"slow"`` prints and sleeps after
    each step. A fresh process, not this one, is the reference: what earlier tests imported or
    changed here can change how the model is initialised."""
    cmd = [sys.executable, "-c", CHILD, mode, "finetune", "--model", str(tiny / "model"),
           "--data", str(tiny / "data.csv"), "--label-column", "topic", "--batch-size", "8",
           "--lr", "0.01", "--progress", "none", "--output", str(out), *FLAGS]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    "signum",
    [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM],
    ids=lambda s: signal.Signals(s).name,
)
def test_real_subprocess_signalled_mid_run_resumes_bitwise(tiny, tmp_path, signum):
    """``torchdora finetune`` in its own process gets a real signal at step 3 of 24, is resumed
    and ends bitwise equal to an uninterrupted run in another fresh process (run alongside)."""
    reference = cli_child(tiny, tmp_path / "reference", "fast")
    child = cli_child(tiny, tmp_path / "run", "slow")
    try:
        for line in child.stdout:
            if line.startswith("step 3"):
                child.send_signal(signum)
                break
        _, err = child.communicate(timeout=60)
        reference.communicate(timeout=60)
    finally:
        child.kill()
        reference.kill()
    assert reference.returncode == 0
    assert child.returncode == 128 + signum, err
    assert cli_errors(err)[-1].startswith(
        f"torchdora finetune: interrupted by {signal.Signals(signum).name} after step "
    )
    out = tmp_path / "run"
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 24
    assert test_cli.finetune(tiny, out, *FLAGS, "--resume", str(out / "checkpoint")) == 0
    assert_bitwise(
        load_file(out / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"),
    )
