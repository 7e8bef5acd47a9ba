"""Stopping training cleanly on SIGINT/SIGTERM: the first signal asks for a stop after the
current optimizer step, a second one stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the signals that stop training cleanly (see :meth:`~torchdora.train.Trainer.train`)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM.

    A ``KeyboardInterrupt``, so code that already handles Ctrl-C handles it too. ``checkpoint``
    is the folder to resume from (``None`` when there is none), ``step`` the optimizer steps
    completed, ``signum`` the signal. After a second signal the checkpoint is the last
    complete one, which may be of an earlier step.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        if checkpoint is None:
            where = "no checkpoint was saved (no checkpoint_dir)"
        else:
            where = f"resume from the checkpoint in {checkpoint}"
        super().__init__(f"stopped by {name} after step {step}; {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """While entered, SIGINT/SIGTERM set :attr:`signum` (for the loop to check after each
    step, so a step is never cut in half) and a second one raises ``at_once(signum)`` from the
    handler. The previous handlers are put back on exit. Python lets only the main thread set
    handlers: in another thread nothing changes and :attr:`signum` stays ``None``."""

    def __init__(self, at_once: Callable[[int], BaseException]) -> None:
        self.at_once = at_once
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            return
        raise self.at_once(signum)
