"""The faults a test asks bfly to fake, all in one place.

A trainer's: a stall (BFLY_TEST_STALL), a slow rank (BFLY_TEST_SLOW_RANK) and a checkpoint write paused
half-way (BFLY_TEST_PAUSE_CHECKPOINT); what each means is bfly.core.env.FaultSpec's. The job installs them
through one object, `Faults`: its `stall_for_test` into the heartbeat (bfly.job.watchdog: the stall happens
where a real one would, so the stack dump shows it there), `component()` into the run's loop (the slow
rank's batches), and `before_write` into the checkpoint writer. With no fault requested, none of them does
anything.

A node's, as bfly.nodecheck sees it (`node_faults`): BFLY_TEST_NODE_FAULT=<node>:<fault>=<value>[;...],
on <node> only:

    data=<path>          the data root is read at <path> (a stale or partial copy of the data)
    rundir=<path>        the run directory is <path> (a local disk, not the shared one)
    version=<key>@<v>    the version <key> (python, torch, cuda, nccl, bfly) reads <v>
    clock=<seconds>      the clock reads <seconds> ahead
    slow=<seconds>       each all-reduce of the check waits <seconds> first (a slow link)
    absent=<seconds>     the node waits <seconds> before it joins the check (a node that never comes)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bfly.core import env as environ
from bfly.core.env import FaultSpec, fault_spec
from bfly.run.loop import Callback


class Faults:
    """The faults this rank was asked to fake."""

    def __init__(self, spec: FaultSpec, rank: int):
        self.spec, self.rank = spec, rank
        self._stalls = [s for s in spec.stalls if s.rank == rank]

    @classmethod
    def requested(cls, rank: int) -> Faults:
        return cls(fault_spec(), rank)

    def stall_for_test(self, phase: str, global_step: int) -> None:
        """On entering `phase` at `global_step` (the heartbeat's): sleep, as a stalled rank would."""
        for stall in self._stalls:
            if stall.phase != phase:
                continue
            if stall.from_step is None:
                time.sleep(stall.seconds)
            elif global_step >= stall.from_step:
                self._stalls.remove(stall)
                end = time.monotonic() + stall.seconds
                while time.monotonic() < end:  # a stop signal interrupts sleep: stay stalled
                    time.sleep(min(1.0, max(end - time.monotonic(), 0.0)))
            return

    def component(self) -> Callback | None:
        """The run's loop component of this rank's faults: its slow batches (None: not the slow rank)."""
        slow = self.spec.slow_rank
        return SlowBatches(slow[1]) if slow is not None and slow[0] == self.rank else None

    @property
    def before_write(self) -> Callable[[Path], None] | None:
        """The checkpoint writer's hook that pauses a write half-way (None: no pause asked for)."""
        pause = self.spec.pause_checkpoint
        return None if pause is None else lambda tmp: _pause_half_written(tmp, pause)


class SlowBatches(Callback):
    """This rank waits `seconds` longer for each training batch, as a rank on a slow disk would."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def batches(self, batches: Iterable, split: str) -> Iterable:
        return _delayed(batches, self.seconds) if split == "train" else batches


def _delayed(batches: Iterable[Any], seconds: float) -> Iterator[Any]:
    for batch in batches:
        time.sleep(seconds)
        yield batch


def _pause_half_written(tmp: Path, pause: Path) -> None:
    """A test kills the process while this write is half done: `pause` says where (once per file)."""
    if pause.exists():
        return
    pause.write_text(str(tmp))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)


# --- a node's faults, for bfly.nodecheck ----------------------------------------------------------------

KINDS = ("data", "rundir", "version", "clock", "slow", "absent")


@dataclass(frozen=True)
class NodeFaults:
    data: str | None = None
    rundir: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    clock_s: float = 0.0
    slow_s: float = 0.0
    absent_s: float = 0.0


def parse(text: str, node: str) -> NodeFaults:
    """The faults of `node` in a BFLY_TEST_NODE_FAULT value; an item that does not parse is an error naming it."""
    found: dict[str, object] = {"versions": {}}
    for item in filter(None, (i.strip() for i in text.split(";"))):
        where, _, rest = item.partition(":")
        kind, sep, value = rest.partition("=")
        if not sep or kind not in KINDS:
            raise RuntimeError(f"BFLY_TEST_NODE_FAULT item {item!r}: expected <node>:<fault>=<value>, fault in {KINDS}")
        if where != node:
            continue
        if kind == "version":
            key, _, version = value.partition("@")
            found["versions"][key] = version  # type: ignore[index]
        elif kind in ("data", "rundir"):
            found[kind] = value
        else:
            found[f"{kind}_s"] = float(value)
    return NodeFaults(**found)  # type: ignore[arg-type]


def node_faults(node: str) -> NodeFaults:
    return parse(environ.node_faults_for_test(), node)
