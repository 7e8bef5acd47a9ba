"""Keep freed CPU memory in the process, so a training step does not fault its tensors in anew.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc gives freed memory at the
top of its heap back to the system once more than ``M_TRIM_THRESHOLD`` of it is free (by
default twice the largest tensor freed so far), so a training loop, which frees its
activations at the end of every step, has the kernel hand it zeroed pages again on the next:
one page fault per 4 KiB. A DoRA layer keeps one activation more than a LoRA layer and crosses
that threshold more often, so the faults weigh on DoRA's step more than on LoRA's
(``benchmarks/RESULTS.md`` measures both). The CUDA caching allocator does the same keeping on
GPU; jemalloc or tcmalloc do it on CPU when preloaded.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's largest ``M_MMAP_THRESHOLD`` on 64-bit: bigger blocks are always mapped afresh."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory kept at the top of the heap before any goes back (a C ``int``: ~2 GiB)."""
ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Tell glibc's ``malloc`` to keep freed memory (up to 2 GiB) instead of returning it.

    Blocks up to 32 MiB come from the heap and stay there when freed; larger ones are mapped
    and unmapped as before. Resident memory then stays at the run's peak rather than falling
    between steps. Process-wide and permanent, so it suits a program that owns its process:
    ``torchdora finetune`` calls it. Does nothing where the C library is not glibc, or where
    the user set ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` themselves.

    Returns:
        Whether the setting was applied.
    """
    if any(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
