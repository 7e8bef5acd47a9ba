"""The run folder of ``torchdora finetune``: checked before any work, emptied of an earlier
run on request, and never left half-written by a run that fails or is stopped."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchdora.analysis import DECOMPOSITION_FILE, DECOMPOSITION_PLOT, LOSS_PLOT, METRICS_FILE
from torchdora.distributed import is_main_process

CHECKPOINT_DIR = "checkpoint"
#: What a run folder holds (``analyze`` adds the plots), ``True`` for a folder: what
#: ``overwrite`` removes, and what must not stand in the way of a resumed run's files.
RUN_ENTRIES = {
    "adapter": True,
    "merged": True,
    CHECKPOINT_DIR: True,
    "config.json": False,
    "metrics.json": False,
    METRICS_FILE: False,
    DECOMPOSITION_FILE: False,
    DECOMPOSITION_PLOT: False,
    LOSS_PLOT: False,
}
#: What a failed or interrupted run leaves when it saved a checkpoint: all ``resume`` needs.
RESUMABLE = (CHECKPOINT_DIR, METRICS_FILE, DECOMPOSITION_FILE)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it writable now, before any training time is spent."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"output folder {path} is not writable: {err.strerror}") from None
    return path


def check_run_folder(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse ``path`` as a run folder, before any work, if it cannot be one: a file is in the
    way; it holds files but neither ``resume`` (continue the run there) nor ``overwrite``
    (start afresh) was asked for; or, resuming, an entry there is a file where the run writes
    a folder or the other way round."""
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"output folder {path} is not writable: {existing} is a file")
    if existing != path or overwrite:
        return
    if not resume and any(path.iterdir()):
        checkpoint = path / CHECKPOINT_DIR
        hint = (
            f"--resume {checkpoint} to continue the run there, or " if checkpoint.is_dir() else ""
        )
        raise ValueError(
            f"output folder {path} is not empty: pass {hint}--overwrite to start afresh "
            "(or choose another --output)"
        )
    for name, is_folder in RUN_ENTRIES.items():
        entry = path / name
        if entry.exists() and entry.is_dir() != is_folder:
            kind = "folder" if is_folder else "file"
            raise ValueError(f"{entry} is in the way of the run's {name} {kind}: move it away")


@contextmanager
def run_folder(output: str | None, *, resume: bool, overwrite: bool) -> Iterator[Path | None]:
    """``output`` for the run, ``None`` without one and on ranks other than 0 (they write
    nothing): checked (:func:`check_run_folder`), with ``overwrite`` emptied of an earlier
    run's :data:`RUN_ENTRIES`, created and proven writable, all before any work.

    If the run then fails or is stopped, what it created is removed again, except a saved
    checkpoint and its logs (:data:`RESUMABLE`): a run leaves its finished folder or a
    resumable one, never a half-written one, and what was there before stays."""
    if output is None or not is_main_process():
        yield None
        return
    path = Path(output)
    check_run_folder(path, resume=resume, overwrite=overwrite)
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    created = missing[-1] if missing else None  # the outermost folder this run creates
    if overwrite:
        for name in RUN_ENTRIES:
            _remove(path / name)
    before = set(path.iterdir()) if path.is_dir() else set()
    try:
        yield check_output_dir(path)
    except BaseException:
        keep = RESUMABLE if (path / CHECKPOINT_DIR).is_dir() else ()
        if created is not None and not keep:
            shutil.rmtree(created, ignore_errors=True)
        elif path.is_dir():
            for entry in set(path.iterdir()) - before:
                if entry.name not in keep:
                    _remove(entry)
        raise


def _remove(path: Path) -> None:
    """Delete the file or folder ``path`` if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
