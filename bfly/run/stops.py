"""When a run stops before the end of its schedule: a stop signal on any rank (the ranks agree on it), or
this job's budget (run.stop_after_steps, run.stop_after_epochs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bfly.core import distributed
from bfly.core.engine import TrainState
from bfly.core.env import DistEnv
from bfly.core.stopping import StopRequest
from bfly.run.loop import Callback, LogPoint
from bfly.run.outcome import Outcome
from bfly.run.phases import Phases


@dataclass(frozen=True)
class JobBudget(Callback):
    """run.stop_after_*: how much of the schedule this job runs before it checkpoints and exits."""

    start_step: int
    start_epoch: int
    max_steps: int
    max_epochs: int

    def steps_done(self, global_step: int) -> bool:
        return self.max_steps > 0 and global_step - self.start_step >= self.max_steps

    def epochs_done(self, epoch: int) -> bool:
        return self.max_epochs > 0 and epoch - self.start_epoch >= self.max_epochs

    def should_stop(self, state: TrainState, at_log: bool) -> bool:
        return self.steps_done(state.global_step)  # the same step on every rank: no need to agree

    def stop_after_epoch(self, state: TrainState) -> bool:
        return self.epochs_done(state.epoch)

    def on_stop(self, state: TrainState, outcome: Outcome) -> Outcome:
        if self.steps_done(state.global_step):
            return dataclasses.replace(outcome, stopped_by="run.stop_after_steps")
        if self.epochs_done(state.epoch):
            return dataclasses.replace(outcome, stopped_by="run.stop_after_epochs")
        return outcome


class StopAgreement(Callback):
    """A stop signal stops every rank at the same step: under DDP the ranks agree at log points (its flag
    rides on the log point's exchange, bfly.run.exchange) and at the end of each epoch; a single process
    stops at the next step. A signal this process received names the outcome; else another rank's did."""

    width = 1

    def __init__(self, stop: StopRequest, env: DistEnv, device: torch.device, phases: Phases):
        self.stop, self.env, self.device, self.phases = stop, env, device, phases
        self._agreed = False  # some rank's flag was up at the last log point

    def row(self, point: LogPoint) -> list[float]:
        return [float(self.stop.requested)]

    def arrived(self, table: torch.Tensor, point: LogPoint) -> None:
        self._agreed = bool(table.max() > 0)

    def should_stop(self, state: TrainState, at_log: bool) -> bool:
        if not self.env.distributed:
            return self.stop.requested
        return at_log and self._agreed

    def stop_after_epoch(self, state: TrainState) -> bool:
        self.phases.enter("collective")
        return distributed.any_rank(self.stop.requested, self.device)

    def on_stop(self, state: TrainState, outcome: Outcome) -> Outcome:
        named = self.stop.signal_name or outcome.stopped_by  # this process's own signal comes first
        return dataclasses.replace(outcome, stopped_by=named, signals=tuple(self.stop.caught))
