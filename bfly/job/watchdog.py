"""A rank that stops making progress is found, named, its stacks written, and the job ended (exit 76).

The training loop keeps a `Heartbeat`: the phase it is in (startup, rendezvous, data, forward-backward,
collective, eval, checkpoint), the global step, and when it last moved. Updating it is a few attribute
writes: no system call, no collective. A daemon thread per process (`Watchdog`) publishes it every few
seconds to the job's rendezvous store (a TCPStore every rank reaches across nodes; no shared file system
needed) and reads the other ranks'. Ages are measured on each rank's own clock, so clocks of different
hosts need not agree.

The job is hung when no rank has made progress within the limit of the phase it is in:

* start-up, rendezvous, checkpoint writes and this job's first WARM_STEPS steps (torch.compile, cache
  builds): `run.startup_timeout_s`;
* otherwise `run.hang_timeout_s`, or STEP_MULTIPLE x the median step time measured, whichever is
  larger. Evaluation moves the heartbeat at every batch, so a long evaluation is no hang.

A slow rank makes progress at every step: it is not hung. A stalled one stops every rank within a step
(they wait for it in the gradient all-reduce); the stalled rank is told apart from those waiting for it:
a rank whose heartbeat stopped (a stopped or dead process), else one busy in its own work (data, eval,
checkpoint, start-up) rather than in a collective, else the one furthest behind. The process that
serves the store (rank 0, unless torchrun's agent does) is no exception: when the store stops
answering, its host is the rank named. A rank that was stopped itself names no other. Then every live
rank writes its threads' stacks to run.dir/hang/rank<R>-<host>.txt, the first live rank prints one line
naming the stalled rank(s) (console, train.log, wandb) and records the cause (run.dir/hang/cause.json
and the exit records: the restart line names it), a stopped trainer on the same host is killed, and
each live process ends with EXIT_HANG (torchrun then ends the others). The last checkpoint is intact:
checkpoint files are replaced atomically.

A job suspended as a whole (Ctrl-Z, scontrol suspend) is no hang when it goes on, if it was suspended for
less than dist.timeout_s (see `Watchdog.backstop_s`).

A stop signal that the trainer cannot honour (it is blocked in start-up or in a collective and never
reaches a step) ends the process after `run.stop_grace_s`, with its stacks written: the signal is seen
through a wakeup file descriptor, which the C-level signal handler writes even while the main thread
is stuck in C code.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bfly.core.env import DistEnv, agent_serves_store, restart_count, restart_store_shared, store_address
from bfly.core.stopping import STOP_SIGNALS
from bfly.job.ending import (
    bounded,
    exit_hang,
    forked_children,
    kill_stopped,
    local_trainers,
    proc_state,
    stderr_with_fd,
    write_stacks,
)
from bfly.job.exits import EXIT_HANG
from bfly.job.hang import Seen, View, frozen_ranks, judge, stale_after
from bfly.job.heartbeat import STEP_MULTIPLE, WARM_STEPS, Heartbeat, Limits, watched
from bfly.job.nccl import configure_nccl, dump_nccl_trace, nccl_settings
from bfly.run.runlog import append_to_train_log

__all__ = [
    "STEP_MULTIPLE",
    "WARM_STEPS",
    "Heartbeat",
    "Limits",
    "Watchdog",
    "configure_nccl",
    "nccl_settings",
    "watched",
]

RESTART_HINT = (
    "torchrun restarted these workers without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted workers can "
    "hang in the rendezvous (pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"
)


class StoreLink:
    """This rank's side of the job's rendezvous store (a TCPStore every rank reaches across nodes): it
    publishes this rank's record, reads the other ranks', and carries a declared hang to every rank.

    Every exchange runs in a thread of its own, waited for at most `timeout_s`: a request to a store whose
    host is stopped gets no answer, ever (the TCP connection stays open), whatever the store's timeout;
    so does a connection made while the port listens but nobody serves it yet (start-up). While one is
    unanswered no other is sent, and `answered` (when the store last answered) stays old: the judgement
    takes that silence as evidence against the store's host. One unanswered for ABANDON_AFTER timeouts is
    given up (its thread left blocked, at most MAX_ABANDONED of them) and the next goes on a new
    connection."""

    ABANDON_AFTER = 3
    MAX_ABANDONED = 5

    def __init__(self, address: tuple[str, int] | None, prefix: str, env: DistEnv, timeout_s: float):
        self.address, self.prefix, self.env, self.timeout_s = address, prefix, env, timeout_s
        self.store: Any = None
        self.answered: float | None = None  # monotonic time of the last answered exchange
        self._pending: threading.Thread | None = None
        self._pending_since = 0.0
        self._abandoned = 0

    def exchange(self, mine: dict[str, Any], seen: dict[int, Seen]) -> dict[str, str] | None:
        """Publishes `mine`, updates `seen` with the others' records that changed; returns the hang another
        rank declared ({"line", "cause"}), if one did."""
        if self.address is None or self.env.world_size == 1:
            return None
        if self._pending is not None and self._pending.is_alive():  # the last request is still unanswered
            waited = time.monotonic() - self._pending_since
            if waited < self.ABANDON_AFTER * self.timeout_s or self._abandoned >= self.MAX_ABANDONED:
                return None
            self._abandoned += 1
            self.store = None  # a new connection: the old one may never answer
        result: list[dict[str, str] | None] = []
        thread = threading.Thread(target=lambda: result.append(self._exchange(mine, seen)), daemon=True)
        self._pending, self._pending_since = thread, time.monotonic()
        thread.start()
        thread.join(self.timeout_s)
        return result[0] if result else None

    def _exchange(self, mine: dict[str, Any], seen: dict[int, Seen]) -> dict[str, str] | None:
        store = self.store
        if store is None:
            store = self.store = self._connect()
            if store is None:
                return None
        try:
            store.set(self._key(self.env.rank), json.dumps(mine))
            others = [r for r in range(self.env.world_size) if r != self.env.rank]
            present = [self._key(r) for r in others if r in seen or store.check([self._key(r)])]
            for raw in store.multi_get(present) if present else []:
                record = json.loads(bytes(raw))
                old = seen.get(record["rank"])
                if old is None or old.record["seq"] != record["seq"]:
                    seen[record["rank"]] = Seen(record, time.monotonic())
            declared = None
            if store.check([f"{self.prefix}/hang"]):
                declared = json.loads(bytes(store.get(f"{self.prefix}/hang")))
        except Exception:  # the store's host is gone: judge on what was seen last
            return None
        self.answered = time.monotonic()
        return declared

    def declare(self, line: str, cause: str) -> None:
        """Tells the other ranks (they read it at their next poll)."""
        store = self.store
        if store is not None:
            bounded(lambda: store.set(f"{self.prefix}/hang", json.dumps({"line": line, "cause": cause})), 2)

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/rank{rank}"

    def _connect(self) -> Any:
        from datetime import timedelta

        from torch.distributed import TCPStore

        host, port = self.address  # type: ignore[misc]
        try:
            return TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False
            )
        except Exception:  # not up yet (rank 0 hosts it once it reaches the rendezvous)
            return None


class StopSignals:
    """Stop signals, as they arrive, on a pipe the thread reads: Python runs signal handlers in the main
    thread only, and not while it is blocked in C code (a collective, the rendezvous). The C-level
    handler writes the wakeup file descriptor even then."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._previous = -1

    def watch(self) -> None:
        """From the main thread (elsewhere: nothing is watched)."""
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return
        self._fds = (r, w)

    def arrived(self) -> str | None:
        """The name of the first stop signal that arrived since the last call, if any."""
        if not self._fds:
            return None
        try:
            data = os.read(self._fds[0], 512) if select.select([self._fds[0]], [], [], 0)[0] else b""
        except OSError:
            return None
        stops = [int(s) for s in STOP_SIGNALS]
        return next((signal.Signals(num).name for num in data if num in stops), None)

    def close(self) -> None:
        if self._fds and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._previous)
            for fd in self._fds:
                os.close(fd)
            self._fds = None


def published_record(
    beat: Heartbeat, limits: Limits, rank: int, host: str, pid: int, seq: int, now: float
) -> dict[str, Any]:
    """A rank's heartbeat as published (seq: how many it published before): what the other ranks judge it by."""
    idle, limit = now - beat.since, beat.limit(limits)
    mine = {
        "seq": seq,
        "rank": rank,
        "host": host,
        "pid": pid,
        "step": beat.step,
        "phase": beat.phase,
        "idle": round(idle, 1),
        "limit": limit,
        "steady": beat.steady_limit(limits),
    }
    if beat.phase in ("data", "eval") and idle > limit / 2:
        mine["workers"] = [[p, proc_state(p)] for p in forked_children()]
    return mine


class Watchdog:
    """A daemon thread per process: every poll it publishes this rank's heartbeat, reads the others', judges
    (bfly.job.hang), and ends the process on a hang or a stop it cannot honour in time."""

    def __init__(
        self,
        beat: Heartbeat,
        env: DistEnv,
        limits: Limits,
        run_dir: Path,
        address: tuple[str, int] | None,
        hint: str | None,
    ):
        self.beat, self.env, self.limits, self.run_dir = beat, env, limits, run_dir
        self.address, self.hint = address, hint
        self.host, self.pid = socket.gethostname(), os.getpid()
        prefix = f"bfly/watchdog/{restart_count()[0]}"
        self.link = StoreLink(address, prefix, env, max(limits.poll_s, 2.0))
        self.on_hang: list[Callable[[str], None]] = []  # rank 0: the wandb sink
        # Every rank, just before it exits with EXIT_HANG, with the line that says why: attempts.jsonl's end.
        self.before_exit: list[Callable[[str], None]] = []
        self.declared: str | None = None  # the hang line, once declared
        self.seen: dict[int, Seen] = {}
        self.started = time.monotonic()
        self.stop_signal: tuple[str, float] | None = None
        self.resumed: float | None = None  # when this process last found it had been stopped
        self._seq = 0
        self._polled = self.started  # when the thread last polled
        self._closed = threading.Event()
        self._signals = StopSignals()
        self._thread = threading.Thread(target=self._run, name="bfly-watchdog", daemon=True)

    @classmethod
    def start(cls, beat: Heartbeat, env: DistEnv, limits: Limits, run_dir: Path, caught: str | None = None) -> Watchdog:
        """From the main thread, before start-up work begins. caught: a stop signal that arrived before."""
        hint = RESTART_HINT if env.source == "torchrun" and restart_count()[0] > 0 and restart_store_shared() else None
        if hint and env.is_main:
            print(f"warning: {hint}", file=sys.stderr, flush=True)
        dog = cls(beat, env, limits, run_dir, store_address(env), hint)
        if limits.stop_grace_s > 0:
            dog._signals.watch()
        if caught:
            dog.stop_signal = (caught, time.monotonic())
        dog._thread.start()
        return dog

    def close(self) -> None:
        """The trainer is done (its outcome decided): the watchdog stops judging."""
        self._closed.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            faulthandler.cancel_dump_traceback_later()
        self._signals.close()

    def settle(self) -> bool:
        """After a failed collective: True when a hang is declared (within one poll, if this rank was stalled
        too: the peer that failed may have been ended by its own watchdog); this thread then ends the
        process with EXIT_HANG. False at once when this rank was making progress (another kind of failure)."""
        if self.declared is None and time.monotonic() - self.beat.since < self.beat.limit(self.limits):
            return False
        end = time.monotonic() + self.limits.poll_s + 1
        while self.declared is None and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.1)
        if self.declared is None:
            return False
        self._thread.join(60)  # it dumps, reports and calls os._exit
        return True

    # --- the thread ---

    def _run(self) -> None:
        while not self._closed.wait(self.interval()):
            try:
                self._tick(time.monotonic())
            except Exception as e:  # the watchdog must never take training down
                print(f"bfly.train: watchdog error [rank {self.env.rank}]: {e!r}", file=sys.stderr, flush=True)

    def _tick(self, now: float) -> None:
        last_poll, self._polled = self._polled, now
        if now - last_poll > stale_after(self.limits):  # this process was stopped (or this thread starved)
            self.resumed = now
        caught = self._signals.arrived()
        if caught and self.stop_signal is None:
            self.stop_signal = (caught, now)
        if self.limits.hang_s > 0 and (err := stderr_with_fd()) is not None:
            faulthandler.dump_traceback_later(self.backstop_s(now), exit=True, file=err)
        mine = published_record(self.beat, self.limits, self.env.rank, self.host, self.pid, self._seq, now)
        self._seq += 1
        self.seen[self.env.rank] = Seen(mine, now)
        declared = self.link.exchange(mine, self.seen)
        if declared:
            self._end(declared["line"], declared["cause"])
        if self.stop_signal and self.limits.stop_grace_s > 0:
            name, at = self.stop_signal
            if now - at > self.limits.stop_grace_s:
                self._end_unstoppable(name, now - at, mine)
        verdict = judge(replace(self.view(now), last_poll=last_poll), self.limits)
        if verdict:
            self._end(verdict.line(self.run_dir / "hang", self.hint), verdict.cause)

    def interval(self) -> float:
        """Seconds to the next poll: the poll interval, but at most a second until every rank has been heard of,
        so that a rank that stops in its first steps is known by its record (its host, step and phase)."""
        return self.limits.poll_s if len(self.seen) == self.env.world_size else min(self.limits.poll_s, 1.0)

    def backstop_s(self, now: float) -> float:
        """Seconds from `now` after which the interpreter's own timer prints every thread's stack and ends
        the process: the backstop for a main thread that holds the GIL while stuck (this thread cannot
        run then). Its clock runs on while the process is stopped, so a job suspended for longer is ended
        when it goes on; that is why it lies past dist.timeout_s, as long as collectives in flight wait
        (they time out too after such a suspension)."""
        left = max(self.beat.limit(self.limits) - (now - self.beat.since), 0)
        return left + max(120, self.limits.collective_s) + 5 * self.limits.poll_s

    def view(self, now: float) -> View:
        """What this rank knows at `now`, the /proc state of frozen ranks on this host included."""
        view = View(
            self.env.rank,
            self.env.world_size,
            self.host,
            self.seen,
            now,
            self.started,
            self.beat.steady_limit(self.limits),
            store=f"{self.address[0]}:{self.address[1]}" if self.address else "",
            resumed=self.resumed,
            store_answered=self.link.answered,
            store_host=None if agent_serves_store() else 0,
        )
        local = [r for r in frozen_ranks(view, self.limits) if r in self.seen and self._is_local(r)]
        unheard = [r for r in range(self.env.world_size) if r not in self.seen]
        pids = local_trainers(self.env.rank, self.env.world_size) if unheard else {}
        return replace(
            view,
            states={r: proc_state(self.seen[r].record["pid"]) for r in local},
            unheard={r: (pids[r], proc_state(pids[r])) for r in unheard if r in pids},
        )

    def _is_local(self, rank: int) -> bool:
        return self.seen[rank].record["host"] == self.host

    # --- ending ---

    def _end(self, line: str, cause: str) -> None:
        """Writes this process's stacks; the first live rank reports `line`; then the process ends.
        cause: the verdict in a few words, for the restart line (bfly.job.retry)."""
        self.declared = line
        view = self.view(time.monotonic())
        frozen = frozen_ranks(view, self.limits)
        live = [r for r in range(self.env.world_size) if r not in frozen]
        reporter = min(live, default=self.env.rank) == self.env.rank
        self.link.declare(line, cause)
        dumped = self.dump(line)
        if reporter:
            print(f"bfly.train [rank {self.env.rank}]: {line}", file=sys.stderr, flush=True)
            append_to_train_log(self.run_dir, line)
            for callback in self.on_hang:
                bounded(functools.partial(callback, line), 20)
        elif not dumped:
            print(f"bfly.train [rank {self.env.rank}]: {line}", file=sys.stderr, flush=True)
        # A stopped trainer of this job on this host is ended here (it can run nothing, not even a handler).
        stopped = [self.seen[r].record["pid"] for r in frozen if r in self.seen and self._is_local(r)]
        kill_stopped(stopped + [pid for pid, _ in view.unheard.values()])
        # Let the other ranks read the verdict (this process may host the store) before ending.
        time.sleep(self.limits.poll_s + 2 if self.env.world_size > 1 else 0)
        exit_hang(self.before_exit, line, cause, self.run_dir if reporter else None)

    def _end_unstoppable(self, signal_name: str, waited: float, mine: dict[str, Any]) -> None:
        line = (
            f"{signal_name} arrived {waited:.0f} s ago and could not be honoured at a step "
            f"(run.stop_grace_s={self.limits.stop_grace_s:g}): blocked in {mine['phase']} at step {mine['step']} "
            f"for {mine['idle']:.0f} s; stacks in {self.dump_path}; ending without a checkpoint (the last one is "
            f"intact), exit {EXIT_HANG}"
        )
        self.declared = line
        self.dump(line)
        print(f"bfly.train [rank {self.env.rank}]: {line}", file=sys.stderr, flush=True)
        exit_hang(self.before_exit, line, f"stop signal not honoured on rank {self.env.rank} ({self.host})")

    @property
    def dump_path(self) -> Path:
        return self.run_dir / "hang" / f"rank{self.env.rank}-{self.host}.txt"

    def dump(self, line: str) -> bool:
        """Every thread's stack (the main thread's too, wherever it is stuck) into run.dir/hang/, and the NCCL
        flight recorder's record beside it."""
        if not write_stacks(self.dump_path, line, self.beat, f"rank {self.env.rank} on {self.host}, pid {self.pid}"):
            return False
        dump_nccl_trace(self.dump_path.with_name(f"nccl-rank{self.env.rank}-{self.host}.pkl"))
        return True
