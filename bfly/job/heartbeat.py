"""What the training loop keeps up to date for the watchdog: its phase, step and when it last moved.

Updating it is a few attribute writes: no system call, no collective. bfly.job.watchdog's thread reads
it; bfly.job.hang judges it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

WARM_STEPS = 3  # steps of a job that keep the start-up limit (the first compiled steps)
STEP_MULTIPLE = 10  # a step this many times the median is still no hang
STARTUP_PHASES = ("startup", "rendezvous", "checkpoint")


@dataclass(frozen=True)
class Limits:
    hang_s: float  # run.hang_timeout_s (0: no hang detection)
    startup_s: float  # run.startup_timeout_s
    stop_grace_s: float  # run.stop_grace_s (0: wait for the stop however long)
    collective_s: float = 0.0  # dist.timeout_s (0: not known)

    @classmethod
    def of(cls, run: Any, collective_s: float = 0.0) -> Limits:
        """From the config's `run` section and dist.timeout_s."""
        return cls(run.hang_timeout_s, run.startup_timeout_s, run.stop_grace_s, collective_s)

    @property
    def poll_s(self) -> float:
        """How often the watchdog publishes and judges: a fifth of the shortest limit, 0.5 to 10 s."""
        shortest = min(x for x in (self.hang_s, self.startup_s, self.stop_grace_s, 50.0) if x > 0)
        return min(max(shortest / 5, 0.5), 10.0)


class Heartbeat:
    """What the training loop updates (attribute writes only); the watchdog thread reads it."""

    def __init__(self, rank: int = 0, stall: Callable[[str, int], None] | None = None):
        self.rank = rank
        self.phase = "startup"
        self.step = 0  # global step
        self.since = time.monotonic()  # when it last moved
        self.steps = 0  # optimizer steps of this job
        self.step_times: deque[float] = deque(maxlen=50)
        self._last_step: float | None = None
        self._stall = stall  # (phase, global step): bfly.job.faults' stall, where a real one would be

    def enter(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()
        if phase in ("eval", "checkpoint"):  # not part of a step's time
            self._last_step = None

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before = self.phase
        self.enter(phase)
        self.stall_for_test(phase)
        try:
            yield
        finally:
            self.enter(before)

    def step_done(self, global_step: int) -> None:
        now = time.monotonic()
        if self._last_step is not None:
            self.step_times.append(now - self._last_step)
        self._last_step, self.since = now, now
        self.step, self.steps = global_step, self.steps + 1

    def limit(self, limits: Limits) -> float:
        """Seconds without progress that are a hang in the current phase."""
        return limits.startup_s if self.phase in STARTUP_PHASES else self.steady_limit(limits)

    def steady_limit(self, limits: Limits) -> float:
        """The limit of a training step, whatever the phase: the start-up one for this job's first steps."""
        if self.steps < WARM_STEPS:
            return limits.startup_s
        typical = statistics.median(self.step_times) if self.step_times else 0.0
        return max(limits.hang_s, STEP_MULTIPLE * typical)

    def stall_for_test(self, phase: str) -> None:
        """bfly.job.faults: sleep here, where a real stall would be (the stack dump shows this frame)."""
        if self._stall is not None:
            self._stall(phase, self.step)


def watched(batches: Iterable, beat: Heartbeat, waiting: str = "data", working: str = "forward-backward") -> Iterator:
    """The batches, with the heartbeat in `waiting` while the next one is fetched and in `working` while the
    caller uses it; once they are exhausted, in "collective" (what follows an epoch or an evaluation)."""
    it = iter(batches)
    while True:
        beat.enter(waiting)
        beat.stall_for_test(waiting)
        try:
            item = next(it)
        except StopIteration:
            beat.enter("collective")
            return
        beat.enter(working)
        yield item
