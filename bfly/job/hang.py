"""The judgement: from what one rank knows of every rank's heartbeat, is the job hung, and who stalled?

A pure function of its input (no clock, no /proc, no store): `judge(view, limits)` gives a `Verdict` or
None. The rules:

* a rank is frozen when its published record stopped changing for 3 polls + 2 s (a stopped or dead
  process, or one that cannot reach the store); the judging rank itself never is;
* each rank has made no progress for `age` seconds (its last record's idle time plus the time since it
  changed; a rank never heard of: since the judging watchdog started, against the start-up limit, or
  the judging rank's step limit when /proc shows it stopped or dead on this host, or it serves the
  store and the store went silent) and
  has a limit: the one its own record states for its phase (start-up, rendezvous, checkpoint and its
  first WARM_STEPS steps: run.startup_timeout_s; otherwise the larger of run.hang_timeout_s and
  STEP_MULTIPLE x its median step). A frozen rank's own limit is as old as its last record, so the
  judging rank's step limit stands for it; and once any rank is frozen, the others are held to their
  step limit, not the longer one of a checkpoint (a stopped peer will not let them finish it);
* the job is hung when every rank's age is past its limit;
* but not judged at a poll that comes late, 3 polls + 2 s after the judging rank's previous one: its own
  process was stopped (Ctrl-Z, a suspended SLURM job), and every record is old for that reason alone.
  The next poll judges the records published after the job went on (a pause longer than the
  watchdog's backstop still ends the process: see bfly.job.watchdog);
* a rank stopped itself since its last progress names no other rank: its own stop explains why the
  others waited (and the ranks that were not stopped judge it). Once its step limit has passed since it
  went on without progress, it names itself;
* when the store that carries the records has not answered for 3 polls + 2 s, the records are old
  because the store is silent: that is evidence against the store's host (rank 0, unless torchrun's
  agent serves the store), not against the other ranks. The store's host is then the one frozen rank;
* the stalled ranks are the frozen ones, else those busy in their own work (a phase that is not
  waiting for another rank), else those furthest behind in steps, else all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bfly.job.exits import EXIT_HANG
from bfly.job.heartbeat import Limits

WAITING = ("rendezvous", "forward-backward", "collective")  # phases that may be waiting for another rank
DEAD_OR_STOPPED = ("T", "t", "Z", "X")  # /proc states of a process that will not make progress
STATES = {
    "R": "running",
    "S": "sleeping",
    "T": "stopped",
    "t": "stopped (traced)",
    "Z": "dead (zombie)",
    "X": "dead",
    "D": "in uninterruptible I/O",
}


@dataclass
class Seen:
    """A rank's published record and when (on the judging rank's clock) it last changed."""

    record: dict[str, Any]
    changed: float


@dataclass(frozen=True)
class View:
    """What the judging rank knows at `now`."""

    rank: int  # the judging rank
    world_size: int
    host: str  # the judging rank's host
    seen: Mapping[int, Seen]  # every rank's last record, the judging rank's own included
    now: float
    started: float  # when the judging rank's watchdog started
    own_steady: float  # the judging rank's step limit (Heartbeat.steady_limit)
    states: Mapping[int, str | None] = field(default_factory=dict)  # /proc state of frozen ranks on this host
    store: str = ""  # the rendezvous store's host:port, named for a rank never heard of
    last_poll: float | None = None  # when the judging rank polled before `now` (None: not known)
    resumed: float | None = None  # when the judging rank last found its own process had been stopped
    store_answered: float | None = None  # when the store last answered (None: at every poll, or no store)
    store_host: int | None = None  # the rank whose process serves the store (None: torchrun's agent)
    unheard: Mapping[int, tuple[int, str | None]] = field(default_factory=dict)  # rank -> (pid, /proc state)
    # of ranks never heard of that run on this host


@dataclass(frozen=True)
class Verdict:
    stalled: tuple[int, ...]  # the ranks named as stalled
    age: float  # seconds since the rank that moved last made progress
    limit: float  # that rank's limit
    named: str  # how the stalled ranks are described
    startup: bool  # a stalled rank is in start-up or the rendezvous (or never heard of)
    cause: str = ""  # in a few words, for the restart line: "hang on rank 1 (host) at step 4"

    def line(self, hang_dir: Path, hint: str | None = None) -> str:
        """The line printed, written to train.log and sent to wandb."""
        line = (
            f"hang: no rank has made progress for {self.age:.0f} s (limit {self.limit:.0f} s); "
            f"stalled: {self.named}; stacks of the live processes in {hang_dir}; "
            f"ending the job (exit {EXIT_HANG})"
        )
        return line + (f"; {hint}" if self.startup and hint else "")


def stale_after(limits: Limits) -> float:
    """Seconds without a new record (or, for the judging rank, without a poll) that mean it was stopped."""
    return 3 * limits.poll_s + 2


def store_silent(view: View, limits: Limits) -> bool:
    """The store that carries the records has not answered for 3 polls + 2 s."""
    return view.store_answered is not None and view.now - view.store_answered > stale_after(limits)


def is_frozen(view: View, rank: int, limits: Limits) -> bool:
    """Its heartbeat stopped being published (stopped, dead, or unreachable). While the store is silent,
    only the store's host is: the others' records are old because the store does not answer."""
    if rank == view.rank:
        return False
    if store_silent(view, limits) and view.store_host is not None and rank != view.store_host:
        return False
    seen = view.seen.get(rank)
    return seen is None or view.now - seen.changed > stale_after(limits)


def stopped_itself(view: View) -> bool:
    """The judging rank's own process was stopped since its last progress."""
    own = view.seen.get(view.rank)
    return view.resumed is not None and own is not None and view.resumed > own.changed - own.record["idle"]


def frozen_ranks(view: View, limits: Limits) -> list[int]:
    return [r for r in range(view.world_size) if is_frozen(view, r, limits)]


def stalled_for(view: View, rank: int, limits: Limits, steady: bool = False) -> tuple[float, float]:
    """(seconds since `rank` last made progress, its limit). steady: the limit of a training step, not
    the longer one of a checkpoint write."""
    seen = view.seen.get(rank)
    if seen is None:  # never heard of: not started, or cannot reach the store
        stopped = view.unheard.get(rank, (0, None))[1] in DEAD_OR_STOPPED
        if stopped or (rank == view.store_host and store_silent(view, limits)):
            # A trainer on this host that stopped or died before any record of it arrived (its first steps
            # are milliseconds long), or the store's host gone silent: the ranks move in step, so this
            # rank's step limit stands for it.
            return view.now - view.started, view.own_steady
        return view.now - view.started, limits.startup_s
    age = seen.record["idle"] + (view.now - seen.changed)
    if is_frozen(view, rank, limits):
        # Its own limit is as old as its last record (perhaps from its first steps): the ranks move in
        # step, so this rank's step limit stands for it.
        return age, view.own_steady
    return age, seen.record["steady" if steady else "limit"]


def judge(view: View, limits: Limits) -> Verdict | None:
    """The verdict when no rank has made progress within its limit, else None (and always None when hang
    detection is off, or this poll came late: the judging rank's own process was stopped)."""
    if limits.hang_s <= 0 or (view.last_poll is not None and view.now - view.last_poll > stale_after(limits)):
        return None
    if stopped_itself(view):
        return _own_stop(view, limits)
    ranks = range(view.world_size)
    frozen = frozen_ranks(view, limits)
    # A rank whose heartbeat stopped (a stopped or dead process) will not finish what it was doing: the
    # others, waiting for it, get no longer limit for being in a checkpoint.
    stalled = {r: stalled_for(view, r, limits, steady=bool(frozen)) for r in ranks}
    if any(age <= limit for age, limit in stalled.values()):
        return None
    seen = view.seen
    busy = [r for r in ranks if r in seen and seen[r].record["phase"] not in WAITING]
    steps = {r: seen[r].record["step"] for r in ranks if r in seen}
    behind = [r for r in steps if steps[r] == min(steps.values())] if len(set(steps.values())) > 1 else []
    culprits = frozen or busy or behind or list(ranks)
    age, limit = min(stalled.values())  # the rank that moved last, and its limit
    named = "; ".join(describe(view, r, stalled[r][0], r in frozen, limits) for r in culprits)
    # In start-up: in its phase, or never heard of and held to the start-up limit (not one found stopped later).
    startup = any(
        seen[r].record["phase"] in ("startup", "rendezvous") if r in seen else stalled[r][1] == limits.startup_s
        for r in culprits
    )
    return Verdict(tuple(culprits), age, limit, named, startup, cause_of(view, culprits, startup))


def _own_stop(view: View, limits: Limits) -> Verdict | None:
    """The judging rank was stopped since its last progress: no verdict on the others. Past its step
    limit since it went on, still without progress, it is the stalled one."""
    assert view.resumed is not None
    if view.now - view.resumed <= view.own_steady:
        return None
    age = stalled_for(view, view.rank, limits)[0]
    named = describe(view, view.rank, age, False, limits)
    named += f"; its own process was stopped until {view.now - view.resumed:.0f} s ago"
    return Verdict((view.rank,), age, view.own_steady, named, False, cause_of(view, [view.rank]))


def cause_of(view: View, culprits: list[int], startup: bool = False) -> str:
    """The verdict in a few words, for the restart line: "hang on rank 1 (host) at step 4"."""
    ranks = ", ".join(str(r) for r in culprits)
    hosts = sorted(
        {
            view.seen[r].record["host"] if r in view.seen else view.host
            for r in culprits
            if r in view.seen or r in view.unheard
        }
    )
    steps = [view.seen[r].record["step"] for r in culprits if r in view.seen]
    where = f" ({', '.join(hosts)})" if hosts else ""
    at = f" at step {min(steps)}" if steps else " in start-up" if startup else ""
    return f"hang on rank{'s' if len(culprits) > 1 else ''} {ranks}{where}{at}"


def describe(view: View, rank: int, age: float, frozen: bool, limits: Limits) -> str:
    """A stalled rank as the hang line names it: who, where, in what state, doing what."""
    seen = view.seen.get(rank)
    if seen is None and rank in view.unheard:
        pid, state = view.unheard[rank]
        return f"rank {rank} ({view.host}, pid {pid}) sent no heartbeat and{_frozen_state(True, state, 0, False)}"
    if seen is None and rank == view.store_host and store_silent(view, limits):
        assert view.store_answered is not None
        silent = view.now - view.store_answered
        return f"rank {rank}, which serves the heartbeat store, sent no heartbeat and its store has not answered for {silent:.0f} s"
    if seen is None:
        where = f" at {view.store}" if view.store else ""
        return f"rank {rank} sent no heartbeat (not started, or cannot reach the rendezvous store{where})"
    rec = seen.record
    who = f"rank {rank} ({rec['host']}, pid {rec['pid']})"
    if frozen:
        local = rec["host"] == view.host
        silent = store_silent(view, limits) and rank == view.store_host
        who += _frozen_state(local, view.states.get(rank), rec["step"], silent)
    phase = {
        "startup": "has not reached the rendezvous (start-up)",
        "rendezvous": "in the rendezvous",
        "data": "waiting for data",
    }.get(rec["phase"], f"in {rec['phase']}")
    workers = rec.get("workers") or []
    if rec["phase"] == "data" and workers:
        phase += " from loader worker(s) " + ", ".join(
            f"pid {pid} ({STATES.get(state, state) if state else 'gone'})" for pid, state in workers
        )
    if frozen:  # what its last record said, which may be older than its stop (records come every poll)
        phase += f" when last heard {view.now - seen.changed:.0f} s ago"
    return f"{who}, {phase}, last step {rec['step']}, {age:.0f} s since its last progress"


def _frozen_state(local: bool, state: str | None, step: int, serves_store: bool) -> str:
    """What is known of a frozen rank's process: its /proc state where it runs on this host."""
    store = ", which serves the heartbeat store," if serves_store else ""
    if not local:
        return f"{store} is unreachable since step {step} (stopped, dead or cut off)"
    if state is None:
        return f"{store} is gone"
    return f"{store} is {STATES[state] if state in DEAD_OR_STOPPED else 'not responding'} (process state {state})"
