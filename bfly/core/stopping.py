"""Stop requests: SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 become a flag the training loop checks at step
boundaries, so a run stops with a checkpoint at the current step instead of dying mid-write.

Who sends what: SLURM sends SIGTERM to every process of a job on preemption, `scancel` and requeue,
and `--signal=B:USR1@T` before the time limit (our sbatch scripts pass it on); submitit sends SIGUSR2;
`timeout` sends SIGTERM; a terminal's Ctrl-C sends SIGINT to the whole foreground process group;
torchrun's agent forwards SIGTERM/SIGINT to each trainer's process group (`os.killpg`). Two things
follow, both handled here:

* DataLoader workers are in the trainer's process group and would die of those signals (torch installs
  a handler in workers that re-raises SIGTERM), taking the epoch with them. They ignore the stop
  signals instead; their parent ends them when it is done. The signals are blocked while workers are
  forked, so none can arrive in the window before a new worker has set its dispositions.
* A trainer whose launcher dies (kill -9 of torchrun's agent) would train on as an orphan. Linux's
  parent-death signal turns the launcher's death into a SIGTERM for the trainer: it checkpoints and exits.

A second signal while the checkpoint is being written changes nothing: the flag is already set.
How a run ends (bfly.run.outcome) and the exit statuses (bfly.job.exits) are decided above this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

# What signal.signal() takes and returns: a function, SIG_DFL / SIG_IGN, or None (set from C).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StopRequest:
    """Records the first stop signal. Installed once per process, before start-up work begins."""

    def __init__(self) -> None:
        self.caught: list[str] = []  # every stop signal received, oldest first
        self._previous: dict[int, SignalHandler] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.caught.append(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str | None:
        """The first stop signal: the one the run stops for."""
        return self.caught[0] if self.caught else None

    @property
    def requested(self) -> bool:
        return bool(self.caught)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Around forking DataLoader workers: children inherit the blocked mask, so a stop signal sent to
    the process group meanwhile waits (in the parent) instead of killing a half-started worker."""
    _end_workers_at_exit()
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@functools.cache  # registered once per process
def _end_workers_at_exit() -> None:
    """Workers that ignore SIGTERM would hang multiprocessing's own exit hook, which ends daemonic
    children with SIGTERM and joins them. A loader normally ends its workers itself; one still alive at
    exit (the loop left by an exception) is ended here with SIGKILL, before multiprocessing's hook runs
    (atexit runs hooks in reverse order of registration, and multiprocessing registered first)."""
    import atexit
    import multiprocessing

    def end_daemonic_children() -> None:
        # torch's SIGCHLD handler would report the killed workers as a failure, with a traceback.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(end_daemonic_children)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: the trainer decides when to stop, the worker only serves batches."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # The trainer's watchdog reads signals from a wakeup pipe (bfly.watchdog) that forked workers inherit.
    signal.set_wakeup_fd(-1)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_PR_SET_PDEATHSIG = 1


def stop_when_parent_dies() -> bool:
    """Linux: SIGTERM this process when its parent (torchrun's agent) dies. Returns False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True
