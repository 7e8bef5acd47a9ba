"""``keep_freed_memory``: glibc keeps freed blocks, so a repeated step stops faulting pages in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from torchdora import cli
from torchdora.train import allocator

# Three 4 MiB tensors alive at once and freed together, as a step's activations are.
STEPS = """
import resource, sys, torch
from torchdora.train import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    held = [torch.ones(2**20) for _ in range(3)]
    del held
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_kept_memory_is_not_faulted_in_again():
    applied, default = _faults_per_step("default")
    assert default > 1000  # glibc's default maps every 4 MiB block afresh: 1024 pages each
    applied, kept = _faults_per_step("keep")
    assert applied == "True"
    assert kept < 0.05 * default


def test_a_users_malloc_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_freed_memory() is False


def test_only_the_finetune_program_keeps_memory(monkeypatch):
    """Run as a program (``argv`` from the command line) ``finetune`` keeps freed memory;
    called from Python (tests, notebooks) the caller's process is left alone."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setitem(cli.COMMANDS, "finetune", lambda args: 0)
    monkeypatch.setitem(cli.COMMANDS, "inspect", lambda args: 0)
    assert cli.main(["finetune"]) == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["torchdora", "inspect", "x"])
    assert cli.main() == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["torchdora", "finetune"])
    assert cli.main() == 0 and calls == [1]
