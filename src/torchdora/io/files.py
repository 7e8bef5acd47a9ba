"""Adapter folders on disk: atomic writes and validated reads, never unpickling.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's
names). Every way a folder can be wrong surfaces as :class:`AdapterFileError` with a message
that names the file and the problem.

Integrity. A weights file written here carries, in its safetensors metadata, a SHA-256 digest
of its tensors and metadata and a copy of the config written with it. Reading checks both: a
damaged file (a flipped bit, a tensor edited in place) or a config from another save (a save
interrupted between its two renames, a hand edit of a field that changes the adapter) is an
error, not a silently different model. Files without them (PEFT's) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
STAGING_PREFIX = ".torchdora-staging-"
DIGEST_KEY = "torchdora_sha256"
CONFIG_KEY = "torchdora_config"
#: every key torchdora writes into the weights' metadata (see write_adapter_folder's callers)
TORCHDORA_KEYS = ("torchdora_version", "torchdora_format", DIGEST_KEY, CONFIG_KEY)
#: config fields that describe where an adapter is used, not what it computes: editing them by
#: hand after a save is fine (every other field must still match the weights' copy)
DESCRIPTIVE_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "task_type")


class AdapterFileError(ValueError):
    """An adapter folder or file that cannot be used; the message says which and why."""


# ----------------------------------------------------------------------------- writing
def write_adapter_folder(
    folder: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> Path:
    """Write ``tensors`` (safetensors, with string ``metadata``) and ``config`` (JSON).

    Both files are written into a hidden staging folder inside ``folder`` and synced to disk
    first, then renamed over the old ones back to back (the config only if its text changed),
    so a crash or kill leaves the previous adapter, or in the instant between the renames a mix
    that reading reports. Staging folders left by an earlier killed save are removed (so two
    processes must not save into the same folder at once).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AdapterFileError(f"cannot create adapter folder {folder}: {err.strerror}") from err
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    metadata = {**metadata, CONFIG_KEY: json.dumps(config, sort_keys=True)}
    metadata[DIGEST_KEY] = tensors_digest(contiguous, metadata)
    try:
        for stale in folder.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:  # safetensors writes through a temporary file of its own: it stays in staging
            _write_synced(staging / WEIGHTS_NAME, lambda p: save_file(contiguous, p, metadata))
            names = [WEIGHTS_NAME]
            if not _has_text(folder / CONFIG_NAME, text):
                _write_synced(staging / CONFIG_NAME, lambda p: p.write_text(text, "utf-8"))
                names.append(CONFIG_NAME)
            for name in names:
                os.replace(staging / name, folder / name)
            _fsync_folder(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        raise AdapterFileError(f"cannot write adapter to {folder}: {err.strerror}") from err
    return folder


def _write_synced(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)``, then flush the file to disk."""
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _has_text(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensors_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes) and the metadata, hex."""
    digest = hashlib.sha256()
    entries = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    digest.update(json.dumps(sorted(entries.items())).encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading
def read_adapter_folder(
    folder: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Config, tensors and metadata of an adapter folder, checked against each other."""
    config = read_config(folder)
    tensors, metadata = read_tensors(folder)
    _check_config_matches_weights(Path(folder), config, metadata)
    return config, tensors, metadata


def not_a_folder(path: str | os.PathLike) -> str:
    """Why ``path``, which is no folder, cannot be used as one, for an error message."""
    return "is a file, not a folder" if Path(path).exists() else "does not exist"


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``folder/adapter_config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise AdapterFileError(f"adapter folder {folder} {not_a_folder(folder)}")
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: not an adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSON errors
        raise AdapterFileError(f"{path} is not valid JSON: {err}") from err
    except OSError as err:
        raise AdapterFileError(f"cannot read {path}: {err.strerror}") from err
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def read_tensors(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``folder/adapter_model.safetensors``; pickles are refused.

    A file that carries a digest (written by :func:`write_adapter_folder`) must match it.
    """
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
    ours = [key for key in TORCHDORA_KEYS if key in metadata]
    if ours and len(ours) < len(TORCHDORA_KEYS):
        # safetensors writes metadata keys in no fixed order, so one damaged byte can hit the
        # name of the digest itself; a file with some of our keys must have them all
        missing = sorted(set(TORCHDORA_KEYS) - set(ours))
        raise AdapterFileError(
            f"{path} is corrupt: written by torchdora but its metadata lacks {missing}"
        )
    if DIGEST_KEY in metadata and tensors_digest(tensors, metadata) != metadata[DIGEST_KEY]:
        raise AdapterFileError(
            f"{path} is corrupt: its contents do not match the checksum written with them "
            "(the file was damaged or modified after it was saved)"
        )
    return tensors, metadata


def _check_config_matches_weights(
    folder: Path, config: dict[str, Any], metadata: dict[str, str]
) -> None:
    """The config must be the one the weights were written with, up to descriptive fields."""
    if CONFIG_KEY not in metadata:
        return  # not written by torchdora (or by an older version): nothing to compare
    try:
        saved = json.loads(metadata[CONFIG_KEY])
    except ValueError as err:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: unreadable {CONFIG_KEY}") from err
    if not isinstance(saved, dict):
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: {CONFIG_KEY} is not a JSON object")
    differing = sorted(
        key
        for key in set(config) | set(saved)
        if key not in DESCRIPTIVE_FIELDS and config.get(key) != saved.get(key)
    )
    if differing:
        shown = "; ".join(
            f"{key} is {config.get(key)!r} there but was {saved.get(key)!r}"
            for key in differing[:5]
        )
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} does not belong to the weights beside it ({shown}): the "
            "folder mixes two saves (a save interrupted between its two renames) or the config "
            "was edited by hand. Save the adapter again"
        )
