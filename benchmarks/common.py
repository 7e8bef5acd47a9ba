"""Shared pieces of the benchmark scripts: timing, interleaving, peak memory, tables.

Rules every script here follows (the machine is shared, so noise is the enemy):

* the compared variants run interleaved, in a rotating order, and each gets the median of
  ``reps`` (≥ 10 by default) timed steps after warm-up; ratios are taken within one run;
* torch threads are set explicitly (``--threads``, default 2);
* other processes' CPU use is measured around every round of the interleaved variants; a
  round they disturbed (``--max-other-load``) is thrown away and run again, and the record of
  kept and redone rounds goes into the results;
* peak memory is measured in a fresh subprocess per case and variant, as the step's own
  high-water mark above what was resident just before it (CPU: ``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``);
* on CUDA, steps are timed with CUDA events; ``--device cuda`` without CUDA exits cleanly.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x1024"`` → ``(4096, 1024)``: (out_features, in_features), PyTorch's weight layout."""
    out_features, in_features = (int(v) for v in text.lower().split("x"))
    return out_features, in_features


def csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse type for comma-separated lists."""
    return lambda text: [kind(v) for v in text.split(",") if v]


MALLOC = {"freed memory": "returned to the system (glibc default)"}
"""How this process's ``malloc`` treats freed memory, for :func:`machine` (set by :func:`setup`)."""


def setup(
    device: str, threads: int, seed: int = 0, keep_freed_memory: bool = False
) -> torch.device:
    """Fix threads, seed and ``malloc`` policy; exit cleanly (status 0) when CUDA is asked for
    but absent."""
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: skipping (nothing was measured).")
        sys.exit(0)
    if keep_freed_memory:
        from torchdora.train.allocator import keep_freed_memory as keep

        if keep():
            MALLOC["freed memory"] = "kept, as `torchdora finetune` does"
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch.device(device)


def add_malloc_argument(parser) -> None:
    """``--keep-freed-memory``: measure with ``torchdora.train.keep_freed_memory`` applied."""
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="keep freed CPU memory in the process (glibc), as `torchdora finetune` does",
    )


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "cpu": _cpu_model(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),  # AVX2: bfloat16 is slow
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        **MALLOC,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(metadata.PackageNotFoundError):
        info["peft"] = metadata.version("peft")
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.*)", f.read())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


def load() -> float:
    """The 1-minute load average (0 where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``step`` takes: wall clock on CPU, CUDA events on a GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    step()
    return time.perf_counter() - begin


class OtherLoad:
    """The share of all CPU capacity that *other* processes used since :meth:`mark`.

    ``/proc/stat`` busy time minus this process's own CPU time (all its threads), over the
    wall time times the number of CPUs. Linux only; elsewhere it always reads 0.
    """

    def __init__(self) -> None:
        self.enabled = os.path.exists("/proc/stat")
        self.tick = os.sysconf("SC_CLK_TCK") if self.enabled else 100
        self.mark()

    def _busy_s(self) -> float:
        if not self.enabled:
            return 0.0
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields) - idle) / self.tick

    def mark(self) -> None:
        times = os.times()
        self.start = (time.perf_counter(), self._busy_s(), times.user + times.system)

    def share(self) -> float:
        wall0, busy0, own0 = self.start
        times = os.times()
        wall = time.perf_counter() - wall0
        others = (self._busy_s() - busy0) - (times.user + times.system - own0)
        return max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)

    def wait_quiet(self, limit: float, patience_s: float, probe_s: float = 0.5) -> float:
        """Sleep until others use ≤ ``limit`` of the CPUs over a probe (at most ``patience_s``)."""
        deadline = time.perf_counter() + patience_s
        while True:
            self.mark()
            time.sleep(probe_s)
            share = self.share()
            if share <= limit or time.perf_counter() >= deadline:
                return share
            time.sleep(2.0)


def interleaved(
    steps: dict[str, Callable[[], object]],
    reps: int,
    warmup: int,
    device: torch.device,
    max_other_load: float = 1.0,
    patience_s: float = 0.0,
) -> tuple[dict[str, list[float]], dict]:
    """Time every step ``reps`` times, interleaved in a rotating order, after ``warmup`` calls.

    A round (each step once) during which other processes used more than ``max_other_load``
    of the CPUs is thrown away and run again, up to ``2 * reps`` times per case, after
    waiting up to ``patience_s`` for the machine to quieten. Returns the times and a record
    of the rounds (other processes' share of each kept round, how many were redone).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    meter, kept, redone = OtherLoad(), [], 0
    for rep in range(reps):
        k = rep % len(names)
        while True:
            if patience_s > 0:
                meter.wait_quiet(max_other_load, patience_s)
            meter.mark()
            sample = {name: time_once(steps[name], device) for name in names[k:] + names[:k]}
            share = meter.share()
            if share <= max_other_load or redone >= 2 * reps:
                break
            redone += 1
        kept.append(round(share, 3))
        for name, seconds in sample.items():
            times[name].append(seconds)
    return times, {"other_load": kept, "redone": redone}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``name``'s time ÷ ``baseline``'s in the same round.

    The two ran back to back, so a slow spell of the machine slows both and cancels in the
    ratio; the ratio of the two medians does not pair them, and on this shared machine a whole
    model's step moves by ±15% from round to round.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def peak_memory(step: Callable[[], object], device: torch.device, warmup: int = 1) -> float:
    """MiB the step needs above what was resident just before it (call in a fresh process).

    Warm-up runs first, so lazily created state (optimizer moments, library workspaces) is
    part of the baseline and the number is the step's own transient peak.
    """
    for _ in range(warmup):
        step()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


PEAK_PREFIX = "PEAK_MIB "
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc otherwise keeps freed blocks of up to 32 MiB for reuse (its threshold adapts), so a
step reusing the warm-up's freed memory would not raise the RSS at all: every block of 64 KiB
or more is mapped on allocation and returned on free, and the RSS follows the live tensors."""


def report_peak(value: float) -> None:
    """What a memory child prints for :func:`peak_in_subprocess` to read."""
    print(f"{PEAK_PREFIX}{value:.3f}", flush=True)


def peak_in_subprocess(script: str, args: Sequence[str], timeout: float = 900) -> float:
    """Run ``script args`` in a fresh interpreter and return the peak it reported."""
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith(PEAK_PREFIX):
            return float(line[len(PEAK_PREFIX) :])
    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def rule_summary(results: Sequence[dict], where: Callable[[dict], str]) -> str:
    """How often a measured rule (``result["rule"]``) picked the faster choice (``"best"``), and
    the worst ``rule_cost`` (rule's time ÷ best time) of following it, located by ``where``."""
    agree = sum(r["rule"] == r["best"] for r in results)
    worst = max(results, key=lambda r: r["rule_cost"])
    return (
        f"rule agrees with the faster choice at {agree}/{len(results)} points; worst cost of "
        f"following it: {worst['rule_cost']:.3f}× at {where(worst)}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def save_results(path: str | None, info: dict, results: list, **extra) -> dict:
    """The run's JSON payload (machine, command line, results, ``extra``), written to ``path``."""
    payload = {"machine": info, "command": command_line(), "results": results, **extra}
    write_json(path, payload)
    return payload


def print_row(row: Sequence[object]) -> None:
    """One markdown table row, printed as soon as its case is measured."""
    print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


def command_line() -> str:
    return " ".join([".venv/bin/python", *sys.argv])


def add_noise_arguments(parser) -> None:
    """``--max-other-load`` and ``--patience``: how disturbed rounds are recognised and redone."""
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.1,
        help="redo a round if other processes used more than this share of the CPUs (0-1)",
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=30.0,
        help="seconds to wait for a quiet machine before each round",
    )


def noise_note(rounds: dict) -> str:
    """``median share of the CPUs others used in the kept rounds`` / ``rounds redone``."""
    share = statistics.median(rounds["other_load"]) if rounds["other_load"] else 0.0
    return f"{share:.0%} / {rounds['redone']} redone"
