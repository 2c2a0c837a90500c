"""Stop requests from the outside: SIGTERM (SLURM preemption and time limits; what torchrun
forwards to its workers when it is itself terminated) and SIGUSR1.

A signal only sets a flag. Training checks it at every step boundary, all ranks agree to stop
at the same step, rank 0 saves a checkpoint, and every rank exits with EXIT_CHECKPOINTED.
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: a temporary failure, the caller is invited to try again.
EXIT_CHECKPOINTED = 75


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None

    def install(self) -> StopSignals:
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.received is not None


class Checkpointed(Exception):
    """Training stopped on request after saving a checkpoint; rerunning the command resumes it."""

    exit_code = EXIT_CHECKPOINTED
