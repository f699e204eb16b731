"""Preemption: SIGUSR1 (Slurm ``--signal=USR1@T``) or SIGTERM (scancel, node drain) asks for a checkpoint.

The handler only sets a flag. The training loop folds the flag into its one per-step all-reduce, so every rank
agrees on the same step boundary even when the signal reaches the ranks at different times; it then saves and
exits with ``REQUEUE_EXIT_CODE``, which ``slurm/`` job scripts turn into ``scontrol requeue``.
"""
from __future__ import annotations

import signal
import types

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
REQUEUE_EXIT_CODE = 75
# A non-finite loss is a bug or a divergence, not something a requeue fixes.
NONFINITE_EXIT_CODE = 3

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Installs handlers for SIGUSR1/SIGTERM; ``requested`` says a signal arrived and which one."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signum = signum

    def install(self) -> "PreemptionFlag":
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
