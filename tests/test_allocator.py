"""``keep_freed_memory``: glibc keeps freed blocks, so a repeated step stops faulting pages in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from torchdora import cli
from torchdora.train import allocator

# Five 16 MiB tensors alive at once and freed together, as a step's activations are. glibc's
# default maps blocks that size afresh each time. Its mmap threshold is dynamic, though: it rises
# to the size of the largest mapped block freed so far, and what imports free varies, so in some
# processes 16 MiB blocks came from the heap and were kept anyway. The default case therefore
# pins the threshold at glibc's starting value (128 KiB).
STEPS = """
import resource, sys, torch
from torchdora.train import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    held = [torch.ones(2**22) for _ in range(5)]
    del held
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    env = dict(os.environ)
    for name in allocator.ENVIRONMENT:
        env.pop(name, None)
    if mode == "default":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_kept_memory_is_not_faulted_in_again():
    _, default = _faults_per_step("default")
    assert default > 10000  # 80 MiB of fresh 4 KiB pages is 20480 faults
    applied, kept = _faults_per_step("keep")
    assert applied == "True"
    assert kept < 0.05 * default


def test_a_users_malloc_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_freed_memory() is False


def test_only_the_finetune_program_keeps_memory(monkeypatch):
    """Run as a program (``argv`` from the command line) ``finetune`` keeps freed memory;
    called from Python (tests, notebooks) or under torchrun the process is left alone."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setitem(cli.COMMANDS, "finetune", lambda args: 0)
    monkeypatch.setitem(cli.COMMANDS, "inspect", lambda args: 0)
    assert cli.main(["finetune"]) == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["torchdora", "inspect", "x"])
    assert cli.main() == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["torchdora", "finetune"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: left alone
    assert cli.main() == 0 and calls == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main() == 0 and calls == [1]
