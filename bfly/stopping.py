"""Turns SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM, torchrun and submitit send before a time limit or
preemption) into a flag the training loop checks at step boundaries, so the run stops with a
checkpoint at the current step instead of dying mid-write.

The signals caught are also recorded for the process: a caller that runs the trainer in-process
(launch.job, under submitit) reads them to tell a stopped run from a finished one."""
from __future__ import annotations

import signal


_caught: list[str] = []


def take_caught() -> list[str]:
    """Names of the signals caught since the last call, oldest first."""
    names = list(_caught)
    _caught.clear()
    return names


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        _caught.append(self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
