"""How a run ended: finished, or stopped early (by a signal, or by this job's run.stop_after_* budget)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Why a rank stopped that got no signal itself: another rank did (ranks agree at log points).
OTHER_RANK = "a signal on another rank"


@dataclass(frozen=True)
class Outcome:
    """How a training job ended. `stopped_by`: None (the schedule is complete), a signal name, or the
    run.stop_after_* key whose budget ended this job."""

    stopped_by: str | None = None
    checkpoint: Path | None = None  # where the state at the stop was written
    signals: tuple[str, ...] = ()  # every stop signal this process received (submitit requeues on its own)

    @property
    def finished(self) -> bool:
        return self.stopped_by is None

    @property
    def by_signal(self) -> bool:
        """Stopped by a signal to this process or to another rank (not by a run.stop_after_* budget)."""
        return self.stopped_by is not None and not self.stopped_by.startswith("run.stop_after_")
