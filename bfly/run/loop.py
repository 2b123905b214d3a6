"""The run's loop: epochs -> steps -> end of epoch -> outcome.

Everything around the training itself (the heartbeat's phases, seeding, health, the stop agreement, this
job's budget, the profiler, evaluation, checkpoints, logging) is a component: a `Callback` that owns its
own schedule. The loop calls every component's hook in the order the components are given, so a later
component sees what an earlier one added (a log point's fields, an epoch's record).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from bfly.core.engine import StepHooks, TrainState, Window, train_one_epoch
from bfly.run.build import Run
from bfly.run.outcome import OTHER_RANK, Outcome


@dataclass
class LogPoint:
    """A log point (every train.log_every steps): the engine's window since the last one, its rates once
    read back (bfly.run.exchange), and what the components add to its record (the sinks') and to the
    progress line (its fields)."""

    window: Window
    rates: dict[str, float] = field(default_factory=dict)  # loss, top1, img_per_s, data_wait, lr, window_s
    read_at: float | None = None  # time.perf_counter() when the figures arrived from the device
    record: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, float | str] = field(default_factory=dict)


@dataclass
class EpochEnd:
    """An epoch that just ended (the state has moved on to the next one), as the components fill it in."""

    epoch: int  # the epoch that ended (0-based)
    sums: dict[str, torch.Tensor]  # its running sums, this rank's
    record: dict[str, Any] = field(default_factory=dict)  # its metrics.jsonl record
    metrics: dict[str, Any] = field(default_factory=dict)  # split -> its evaluation
    best: bool = False  # its evaluation is the best so far


class Callback:
    """A component of the run. Every hook does nothing unless a component overrides it."""

    def on_run_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...

    def batches(self, batches: Iterable, split: str) -> Iterable:
        """The batches of `split` ("train" or an evaluation split), wrapped or as they are."""
        return batches

    def after_backward(self) -> None:
        """After each step's gradient all-reduce (the backward pass has returned)."""

    def on_log(self, state: TrainState, point: LogPoint) -> None: ...
    def on_step(self, state: TrainState) -> None: ...

    def should_stop(self, state: TrainState, at_log: bool) -> bool:
        """After each step: end the epoch here? Every rank must answer the same."""
        return False

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None: ...

    def stop_after_epoch(self, state: TrainState) -> bool:
        """After an epoch that is not the last: stop here? Every rank must answer the same."""
        return False

    def on_stop(self, state: TrainState, outcome: Outcome) -> Outcome:
        """The run stops early at `state`: what this component adds to how it ended."""
        return outcome

    def close(self) -> None:
        """The loop is left, however (an error included)."""

    def on_run_end(self, state: TrainState, outcome: Outcome) -> None:
        """After the loop, finished or stopped (not after an error)."""


class Callbacks:
    """The run's components, called in order."""

    def __init__(self, components: Iterable[Callback | None]):
        self.all = [c for c in components if c is not None]

    def step_hooks(self, every_n: int) -> StepHooks:
        """The engine's view of the components; after_backward only when a component has one (per step)."""
        backward = [c for c in self.all if type(c).after_backward is not Callback.after_backward]

        def after_backward() -> None:
            for c in backward:
                c.after_backward()

        return StepHooks(every_n, self.on_log, self.should_stop, self.on_step, after_backward if backward else None)

    def on_run_start(self, state: TrainState) -> None:
        for c in self.all:
            c.on_run_start(state)

    def on_epoch_start(self, state: TrainState) -> None:
        for c in self.all:
            c.on_epoch_start(state)

    def batches(self, batches: Iterable, split: str) -> Iterable:
        for c in self.all:
            batches = c.batches(batches, split)
        return batches

    def on_log(self, state: TrainState, window: Window) -> float:
        """Returns when the window's figures arrived from the device (the next window starts then)."""
        point = LogPoint(window)
        for c in self.all:
            c.on_log(state, point)
        return point.read_at if point.read_at is not None else time.perf_counter()

    def on_step(self, state: TrainState) -> None:
        for c in self.all:
            c.on_step(state)

    def should_stop(self, state: TrainState, at_log: bool) -> bool:
        # The first that says stop ends the question: those after it (a collective) are not asked.
        return any(c.should_stop(state, at_log) for c in self.all)

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        for c in self.all:
            c.on_epoch_end(state, end)

    def stop_after_epoch(self, state: TrainState) -> bool:
        return any(c.stop_after_epoch(state) for c in self.all)

    def on_stop(self, state: TrainState) -> Outcome:
        outcome = Outcome(OTHER_RANK)  # unless a component knows better (its own signal, its budget)
        for c in self.all:
            outcome = c.on_stop(state, outcome)
        return outcome

    def close(self) -> None:
        for c in self.all:
            c.close()

    def on_run_end(self, state: TrainState, outcome: Outcome) -> None:
        for c in self.all:
            c.on_run_end(state, outcome)


def train_loop(run: Run, state: TrainState, components: Callbacks) -> Outcome:
    """Trains from `state` to the end of the schedule or a stop; returns how it ended."""
    epochs = run.cfg.train.epochs
    hooks = components.step_hooks(run.cfg.train.log_every)
    outcome: Outcome | None = None
    try:
        components.on_run_start(state)
        while state.epoch < epochs:
            components.on_epoch_start(state)
            batches = components.batches(run.train_input.batches(state.epoch, state.step_in_epoch), "train")
            if not train_one_epoch(run.trainer, state, batches, hooks):
                outcome = components.on_stop(state)  # at a step, mid-epoch
                break
            finished = state.epoch
            end = EpochEnd(finished, sums=state.next_epoch())
            components.on_epoch_end(state, end)
            if state.epoch < epochs and components.stop_after_epoch(state):
                outcome = components.on_stop(state)  # at the end of an epoch
                break
    finally:
        components.close()
    outcome = outcome or Outcome()
    components.on_run_end(state, outcome)
    return outcome
