"""The process ``test_file_faults`` kills while it saves an adapter.

``python tests/save_worker.py FOLDER SIZE [--kill-between-renames]`` builds the adapted model
``adapted(SIZE)``, prints ``saving`` and saves its adapter to ``FOLDER``. With
``--kill-between-renames`` it SIGKILLs itself right after the first of the save's renames.
The tests import :func:`adapted` to build the same model.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

from torchdora import DoRAConfig, apply_dora
from torchdora.io import save_adapter

WIDTH = 4096
#: size → (rank, modules_to_save): a 0.3 MB adapter, and a 70 MB one (it saves a 4096² layer)
ADAPTERS = {"small": (2, None), "large": (64, ["2"])}


def base() -> nn.Module:
    """Three ``WIDTH``² Linears (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(3)))


def adapted(size: str) -> nn.Module:
    """:func:`base` with its first two layers adapted, random adapters (seed 1)."""
    model = base()
    rank, to_save = ADAPTERS[size]
    config = DoRAConfig(
        target_modules=["0", "1"], rank=rank, alpha=2 * rank, modules_to_save=to_save
    )
    apply_dora(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param), alpha=0.01)
    return model


def _kill_after_first_rename() -> None:
    replace = os.replace

    def replace_then_die(src, dst):
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die


if __name__ == "__main__":
    folder, size = sys.argv[1], sys.argv[2]
    model = adapted(size)
    if "--kill-between-renames" in sys.argv:
        _kill_after_first_rename()
    print("saving", flush=True)
    save_adapter(model, folder)
    print("saved", flush=True)
