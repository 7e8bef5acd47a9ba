"""Adapter folders on disk: atomic writes and validated reads, never unpickling.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's
names). Every way a folder can be wrong surfaces as :class:`AdapterFileError` with a message
that names the file and the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
FORMAT_VERSION = "1"


class AdapterFileError(ValueError):
    """An adapter folder or file that cannot be used; the message says which and why."""


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_adapter_folder(
    folder: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> Path:
    """Write ``tensors`` (safetensors, with string ``metadata``) and ``config`` (JSON).

    The weights are replaced first and the config second, each atomically.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AdapterFileError(f"cannot create adapter folder {folder}: {err.strerror}") from err
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    try:
        _write_atomically(folder / WEIGHTS_NAME, lambda p: save_file(contiguous, p, metadata))
        _write_atomically(folder / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    except OSError as err:
        raise AdapterFileError(f"cannot write adapter to {folder}: {err.strerror}") from err
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``folder/adapter_config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: not an adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def read_tensors(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``folder/adapter_model.safetensors``; pickles are refused."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        pickles = [name for name in PICKLE_NAMES if (Path(folder) / name).is_file()]
        if pickles:
            raise AdapterFileError(
                f"{Path(folder) / pickles[0]} is a pickle file; torchdora never unpickles. Convert "
                "it to safetensors with PEFT first (save_pretrained(safe_serialization=True))"
            )
        raise AdapterFileError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file: {err}") from err
    return tensors, metadata
