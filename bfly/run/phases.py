"""The phases a run goes through (startup, rendezvous, data, forward-backward, collective, eval, checkpoint),
as whoever watches the run for hangs wants to see them. The run announces them; by default nobody listens.
A watcher (the job's heartbeat) subclasses `Phases`, which is also a component of the run's loop."""

from __future__ import annotations

import contextlib

from bfly.run.loop import Callback


class Phases(Callback):
    def enter(self, phase: str) -> None:
        """The run is now in `phase`."""

    def during(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """The run is in `phase` for the block, then back in the phase it was in."""
        return contextlib.nullcontext()

    def saving(self, is_main: bool) -> contextlib.AbstractContextManager[None]:
        """While a checkpoint is saved: rank 0 writes it (the longer limit of a checkpoint write), the other
        ranks only take part in its collectives."""
        return self.during("checkpoint" if is_main else "collective")
