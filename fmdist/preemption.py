"""Stop requests from the outside: SIGTERM (SLURM preemption and time limits; what torchrun
forwards to its workers when it is itself terminated) and SIGUSR1.

A signal only sets a flag. Training checks it at every step boundary, all ranks agree to stop
at the same step, rank 0 saves a checkpoint, and every rank exits with EXIT_CHECKPOINTED.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

# EX_TEMPFAIL from sysexits.h: a temporary failure, the caller is invited to try again.
EXIT_CHECKPOINTED = 75


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> StopSignals:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Give the signals back to whoever had them (a comparison that runs the trainer in-process)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.received is not None


# A file a supervising script names (slurm/train.sbatch): the checkpoint a stop left is written
# into it, because torchrun's own exit code is 1 whenever a worker exits non-zero, 75 included.
STOP_MARKER_ENV = "FMDIST_STOP_MARKER"


class Checkpointed(Exception):
    """Training stopped on request after saving a checkpoint; rerunning the command resumes it."""

    exit_code = EXIT_CHECKPOINTED

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


def mark_checkpointed(checkpoint: Path) -> None:
    marker = os.environ.get(STOP_MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{checkpoint}\n")


# In output_dir: torchrun restarts a worker group whose workers exit non-zero, 75 included, so a
# restarted attempt must learn that the previous one of the same torchrun stopped on request.
STOPPED_FILE = "stopped-by-signal"


def note_stopped_attempt(folder: Path, elastic_run: str) -> None:
    (Path(folder) / STOPPED_FILE).write_text(f"{elastic_run}\n")


def previous_attempt_stopped(folder: Path, restarts: int, elastic_run: str) -> bool:
    """Whether this is torchrun's restart of an attempt that a stop signal ended (then it stops too).
    A first attempt forgets any earlier launch's note: a new command is a new request to train."""
    note = Path(folder) / STOPPED_FILE
    if restarts == 0:
        note.unlink(missing_ok=True)
        return False
    return note.is_file() and note.read_text().strip() == elastic_run
