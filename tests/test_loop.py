"""The run's loop and its components (bfly.run.loop): who stops a run and why, and the order in which the
components are called. Plain objects, no training: the training tests run the loop for real."""

from __future__ import annotations

import torch

from bfly.core.engine import TrainState, Window, new_sums
from bfly.core.env import DistEnv
from bfly.core.stopping import StopRequest
from bfly.run.loop import Callback, Callbacks, EpochEnd, LogPoint
from bfly.run.outcome import OTHER_RANK
from bfly.run.phases import Phases
from bfly.run.stops import JobBudget, StopAgreement

ONE_PROCESS = DistEnv(0, 0, 1, 1, "single", "env://")


def stopping(steps: int = 0, epochs: int = 0, signals: tuple[str, ...] = ()) -> Callbacks:
    stop = StopRequest()  # not installed: the test plays the signals
    stop.caught.extend(signals)
    budget = JobBudget(start_step=10, start_epoch=1, max_steps=steps, max_epochs=epochs)
    return Callbacks([budget, StopAgreement(stop, ONE_PROCESS, torch.device("cpu"), Phases())])


def at(global_step: int, epoch: int = 1) -> TrainState:
    return TrainState(epoch=epoch, step_in_epoch=3, global_step=global_step, sums=new_sums(torch.device("cpu")))


def test_a_single_process_stops_at_the_step_after_its_signal():
    assert not stopping().should_stop(at(11), at_log=False)
    assert stopping(signals=("SIGTERM",)).should_stop(at(11), at_log=False)


def test_a_signal_to_this_process_names_the_stop_even_when_the_budget_is_reached_too():
    outcome = stopping(steps=2, signals=("SIGUSR1", "SIGTERM")).on_stop(at(12))
    assert (outcome.stopped_by, outcome.signals, outcome.by_signal) == ("SIGUSR1", ("SIGUSR1", "SIGTERM"), True)


def test_a_budget_reached_names_its_key_and_is_not_a_signal():
    components = stopping(steps=2)
    assert not components.should_stop(at(11), at_log=True)
    assert components.should_stop(at(12), at_log=True)
    outcome = components.on_stop(at(12))
    assert (outcome.stopped_by, outcome.by_signal, outcome.finished) == ("run.stop_after_steps", False, False)
    epochs = stopping(epochs=1)
    assert not epochs.stop_after_epoch(at(20, epoch=1)) and epochs.stop_after_epoch(at(20, epoch=2))
    assert epochs.on_stop(at(20, epoch=2)).stopped_by == "run.stop_after_epochs"


def test_a_stop_with_no_signal_here_and_no_budget_is_another_ranks_signal():
    assert stopping(steps=5).on_stop(at(12)).stopped_by == OTHER_RANK


class Adds(Callback):
    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def on_log(self, state: TrainState, point: LogPoint) -> None:
        self.calls.append(f"{self.name} sees {sorted(point.fields)}")
        point.fields[self.name] = 1.0

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        end.record[self.name] = len(end.record)

    def close(self) -> None:
        self.calls.append(self.name)


def test_components_are_called_in_order_and_see_what_the_earlier_ones_added():
    calls: list[str] = []
    components = Callbacks([Adds("a", calls), None, Adds("b", calls)])  # None: a component this run has not
    components.on_log(at(11), Window(0.0, 1.0, 12, 1, 0.1, 0.01))
    end = EpochEnd(0, new_sums(torch.device("cpu")))
    components.on_epoch_end(at(11), end)
    components.close()
    assert calls == ["a sees []", "b sees ['a']", "a", "b"]
    assert end.record == {"a": 0, "b": 1}
    assert components.step_hooks(every_n=5).after_backward is None  # none of them needs the per-step call
