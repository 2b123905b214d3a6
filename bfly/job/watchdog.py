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
checkpoint, start-up) rather than in a collective, else the one furthest behind. Then every live rank
writes its threads' stacks to run.dir/hang/rank<R>-<host>.txt, the first live rank prints one line
naming the stalled rank(s) (console, train.log, wandb), and each live process ends with EXIT_HANG
(torchrun then ends the others). The last checkpoint is intact: checkpoint files are replaced atomically.

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
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bfly.core.env import (
    DistEnv,
    restart_count,
    restart_store_shared,
    set_defaults,
    store_address,
)
from bfly.core.stopping import STOP_SIGNALS
from bfly.job.exits import EXIT_HANG, record_exit

WARM_STEPS = 3  # steps of a job that keep the start-up limit (the first compiled steps)
STEP_MULTIPLE = 10  # a step this many times the median is still no hang
WAITING = ("rendezvous", "forward-backward", "collective")  # phases that may be waiting for another rank
STARTUP_PHASES = ("startup", "rendezvous", "checkpoint")
RESTART_HINT = (
    "torchrun restarted these workers without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted workers can "
    "hang in the rendezvous (pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"
)


@dataclass(frozen=True)
class Limits:
    hang_s: float  # run.hang_timeout_s (0: no hang detection)
    startup_s: float  # run.startup_timeout_s
    stop_grace_s: float  # run.stop_grace_s (0: wait for the stop however long)

    @classmethod
    def of(cls, run: Any) -> Limits:
        """From the config's `run` section."""
        return cls(run.hang_timeout_s, run.startup_timeout_s, run.stop_grace_s)

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


# --- NCCL ----------------------------------------------------------------------------------------------


def nccl_settings(run_dir: Path, timeout_s: int) -> dict[str, str]:
    """NCCL's own watchdog, made explicit and consistent with bfly's: a collective that does not finish
    within dist.timeout_s tears the process down (async error handling, the default made explicit), with
    the flight recorder's record of the last collectives dumped into run.dir/hang/ first; the monitor
    that kills a process whose NCCL watchdog itself is stuck waits a minute longer. bfly's watchdog
    (run.hang_timeout_s, below dist.timeout_s) normally names the hang first and saves the flight
    recorder's record itself (dump_nccl_trace)."""
    trace = str(run_dir / "hang" / "nccl-trace-rank")  # NCCL appends the rank
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # tear down the process on a failed or timed-out collective
        "TORCH_NCCL_BLOCKING_WAIT": "0",  # the watchdog, not a blocking wait, times collectives out
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # flight recorder: the last 2000 collectives
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": trace,
        "TORCH_FR_DUMP_TEMP_FILE": trace,
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(timeout_s + 60),
    }


def configure_nccl(run_dir: Path, timeout_s: int) -> dict[str, str]:
    """Before the NCCL process group starts; a variable the user set wins. Returns the settings in effect."""
    (run_dir / "hang").mkdir(parents=True, exist_ok=True)
    return set_defaults(nccl_settings(run_dir, timeout_s))


def dump_nccl_trace(path: Path) -> bool:
    """The NCCL flight recorder's record of this process's collectives (readable with torch's
    `torchfrtrace`); False without NCCL."""
    try:
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_backend() == "nccl"):
            return False
        from torch._C import _distributed_c10d

        path.write_bytes(_distributed_c10d._dump_nccl_trace())  # type: ignore[attr-defined]
        return True
    except Exception:  # a diagnostic: never in the way of ending the job
        return False


# --- processes seen through /proc ----------------------------------------------------------------------

STATES = {
    "R": "running",
    "S": "sleeping",
    "T": "stopped",
    "t": "stopped (traced)",
    "Z": "dead (zombie)",
    "X": "dead",
    "D": "in uninterruptible I/O",
}


def proc_state(pid: int) -> str | None:
    """The state letter of a local process (R, S, D, T, Z, ...), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def forked_children(pid: int | None = None) -> list[int]:
    """This process's forked children (DataLoader workers: same command line), from /proc."""
    pid = pid or os.getpid()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline:
                kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(kids)


# --- the watchdog --------------------------------------------------------------------------------------


@dataclass
class Seen:
    """Another rank's record and when (on this clock) it last changed."""

    record: dict[str, Any]
    changed: float


class Watchdog:
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
        self.prefix = f"bfly/watchdog/{restart_count()[0]}"
        self.on_hang: list[Callable[[str], None]] = []  # rank 0: the wandb sink
        # Every rank, just before it exits with EXIT_HANG, with the line that says why: attempts.jsonl's end.
        self.before_exit: list[Callable[[str], None]] = []
        self.declared: str | None = None  # the hang line, once declared
        self.store: Any = None
        self.seen: dict[int, Seen] = {}
        self.started = time.monotonic()
        self.stop_signal: tuple[str, float] | None = None
        self._seq = 0
        self._closed = threading.Event()
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._thread = threading.Thread(target=self._run, name="bfly-watchdog", daemon=True)

    @classmethod
    def start(cls, beat: Heartbeat, env: DistEnv, limits: Limits, run_dir: Path, caught: str | None = None) -> Watchdog:
        """From the main thread, before start-up work begins. caught: a stop signal that arrived before."""
        hint = RESTART_HINT if env.source == "torchrun" and restart_count()[0] > 0 and restart_store_shared() else None
        if hint and env.is_main:
            print(f"warning: {hint}", file=sys.stderr, flush=True)
        dog = cls(beat, env, limits, run_dir, store_address(env), hint)
        dog._watch_signals()
        if caught:
            dog.stop_signal = (caught, time.monotonic())
        dog._thread.start()
        return dog

    def _watch_signals(self) -> None:
        """Stop signals, as they arrive, on a pipe the thread reads: Python runs signal handlers in the main
        thread only, and not while it is blocked in C code (a collective, the rendezvous)."""
        if self.limits.stop_grace_s <= 0 or threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._previous_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, w)

    def close(self) -> None:
        """The trainer is done (its outcome decided): the watchdog stops judging."""
        self._closed.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            faulthandler.cancel_dump_traceback_later()
        if self._wakeup and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

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
        poll = self.limits.poll_s
        while not self._closed.wait(poll):
            try:
                self._tick(time.monotonic())
            except Exception as e:  # the watchdog must never take training down
                print(f"bfly.train: watchdog error [rank {self.env.rank}]: {e!r}", file=sys.stderr, flush=True)

    def _tick(self, now: float) -> None:
        self._read_signals(now)
        beat = self.beat
        idle, limit = now - beat.since, beat.limit(self.limits)
        if self.limits.hang_s > 0:
            # Backstop for a main thread that holds the GIL while stuck (this thread could not run): the
            # interpreter's own timer prints every thread's stack and exits.
            faulthandler.dump_traceback_later(max(limit - idle, 0) + 120 + 5 * self.limits.poll_s, exit=True)
        mine = {
            "seq": self._seq,
            "rank": self.env.rank,
            "host": self.host,
            "pid": self.pid,
            "step": beat.step,
            "phase": beat.phase,
            "idle": round(idle, 1),
            "limit": limit,
            "steady": beat.steady_limit(self.limits),
        }
        if beat.phase in ("data", "eval") and idle > limit / 2:
            mine["workers"] = [[pid, proc_state(pid)] for pid in forked_children()]
        self._seq += 1
        self.seen[self.env.rank] = Seen(mine, now)
        verdict = self._exchange(mine, now)
        if verdict:
            self._end(verdict)
        if self.stop_signal and self.limits.stop_grace_s > 0:
            name, at = self.stop_signal
            if now - at > self.limits.stop_grace_s:
                self._end_unstoppable(name, now - at, mine)
        if self.limits.hang_s > 0:
            line = self._judge(now)
            if line:
                self._end(line)

    def _read_signals(self, now: float) -> None:
        if not self._wakeup:
            return
        try:
            data = os.read(self._wakeup[0], 512) if _readable(self._wakeup[0]) else b""
        except OSError:
            return
        for num in data:
            if num in [int(s) for s in STOP_SIGNALS] and self.stop_signal is None:
                self.stop_signal = (signal.Signals(num).name, now)

    def _exchange(self, mine: dict[str, Any], now: float) -> str | None:
        """Publishes this rank's record, reads the others'; returns another rank's hang verdict if one is set."""
        if self.address is None or self.env.world_size == 1:
            return None
        if self.store is None:
            self.store = self._connect()
            if self.store is None:
                return None
        try:
            self.store.set(f"{self.prefix}/rank{self.env.rank}", json.dumps(mine))
            others = [r for r in range(self.env.world_size) if r != self.env.rank]
            present = [
                f"{self.prefix}/rank{r}" for r in others if r in self.seen or self._has(f"{self.prefix}/rank{r}")
            ]
            for raw in self.store.multi_get(present) if present else []:
                record = json.loads(bytes(raw))
                old = self.seen.get(record["rank"])
                if old is None or old.record["seq"] != record["seq"]:
                    self.seen[record["rank"]] = Seen(record, now)
            if self.store.check([f"{self.prefix}/hang"]):
                return bytes(self.store.get(f"{self.prefix}/hang")).decode()
        except Exception:  # the store's host is stopped or gone: judge on what was seen last
            return None
        return None

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def _connect(self) -> Any:
        from datetime import timedelta

        from torch.distributed import TCPStore

        host, port = self.address  # type: ignore[misc]
        try:
            return TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=max(self.limits.poll_s, 2.0)),
                wait_for_workers=False,
            )  # fmt: skip
        except Exception:  # not up yet (rank 0 hosts it once it reaches the rendezvous)
            return None

    def stalled_for(self, rank: int, now: float, steady: bool = False) -> tuple[float, float]:
        """(seconds since `rank` last made progress, its limit), as seen from here. steady: the limit of a
        training step, not the longer one of a checkpoint write (see _judge)."""
        seen = self.seen.get(rank)
        if seen is None:  # never heard of: not started, or cannot reach the store
            return now - self.started, self.limits.startup_s
        age = seen.record["idle"] + (now - seen.changed)
        if self.frozen(rank, now) and rank in self.seen:
            # Its own limit is as old as its last record (perhaps from its first steps): the ranks move in
            # step, so this rank's step limit stands for it.
            return age, self.beat.steady_limit(self.limits)
        return age, seen.record["steady" if steady else "limit"]

    def frozen(self, rank: int, now: float) -> bool:
        """Its heartbeat stopped being published (stopped, dead, or unreachable)."""
        if rank == self.env.rank:
            return False
        seen = self.seen.get(rank)
        return seen is None or now - seen.changed > 3 * self.limits.poll_s + 2

    def _judge(self, now: float) -> str | None:
        """The hang line when no rank has made progress within its limit, else None."""
        ranks = range(self.env.world_size)
        frozen = [r for r in ranks if self.frozen(r, now)]
        # A rank whose heartbeat stopped (a stopped or dead process) will not finish what it was doing: the
        # others, waiting for it, get no longer limit for being in a checkpoint.
        stalled = {r: self.stalled_for(r, now, steady=bool(frozen)) for r in ranks}
        if any(age <= limit for age, limit in stalled.values()):
            return None
        busy = [r for r in ranks if r in self.seen and self.seen[r].record["phase"] not in WAITING]
        steps = {r: self.seen[r].record["step"] for r in ranks if r in self.seen}
        behind = [r for r in steps if steps[r] == min(steps.values())] if len(set(steps.values())) > 1 else []
        culprits = frozen or busy or behind or list(ranks)
        age, limit = min(stalled.values())  # the rank that moved last, and its limit
        named = "; ".join(self._describe(r, stalled[r][0], r in frozen) for r in culprits)
        line = (
            f"hang: no rank has made progress for {age:.0f} s (limit {limit:.0f} s); "
            f"stalled: {named}; stacks of the live processes in {self.run_dir / 'hang'}; "
            f"ending the job (exit {EXIT_HANG})"
        )
        startup = any(r not in self.seen or self.seen[r].record["phase"] in ("startup", "rendezvous") for r in culprits)
        if startup and self.hint:
            line += f"; {self.hint}"
        return line

    def _describe(self, rank: int, age: float, frozen: bool) -> str:
        seen = self.seen.get(rank)
        if seen is None:
            where = f" at {self.address[0]}:{self.address[1]}" if self.address else ""
            return f"rank {rank} sent no heartbeat (not started, or cannot reach the rendezvous store{where})"
        rec = seen.record
        who = f"rank {rank} ({rec['host']}, pid {rec['pid']})"
        if frozen:
            local = rec["host"] == self.host
            state = proc_state(rec["pid"]) if local else None
            if state is None and local:
                who += " is gone"
            elif state is not None:
                verdict = STATES[state] if state in "TtZX" else "not responding"
                who += f" is {verdict} (process state {state})"
            else:
                who += " is not responding (stopped, dead or unreachable)"
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
        return f"{who}, {phase}, last step {rec['step']}, {age:.0f} s since its last progress"

    # --- ending ---

    def _end(self, line: str) -> None:
        """Writes this process's stacks; the first live rank reports `line`; then the process ends."""
        self.declared = line
        now = time.monotonic()
        live = [r for r in range(self.env.world_size) if not self.frozen(r, now)]
        reporter = min(live, default=self.env.rank) == self.env.rank
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(f"{self.prefix}/hang", line)
        dumped = self.dump(line)
        if reporter:
            print(f"bfly.train [rank {self.env.rank}]: {line}", file=sys.stderr, flush=True)
            self._append_to_log(line)
            for callback in self.on_hang:
                _bounded(functools.partial(callback, line), 20)
        elif not dumped:
            print(f"bfly.train [rank {self.env.rank}]: {line}", file=sys.stderr, flush=True)
        self._end_stopped_peers(now)
        # Let the other ranks read the verdict (this process may host the store) before ending.
        time.sleep(self.limits.poll_s + 2 if self.env.world_size > 1 else 0)
        self._exit()

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
        self._exit()

    def _end_stopped_peers(self, now: float) -> None:
        """A stopped trainer of this job on this host (state T: it can run nothing, not even a signal handler)
        is ended here; its launcher would wait 30 s more (torchrun) or forever (a plain process)."""
        try:
            mine = Path("/proc/self/cmdline").read_bytes()
        except OSError:
            return
        for rank in range(self.env.world_size):
            rec = self.seen[rank].record if rank in self.seen else None
            if not rec or rank == self.env.rank or rec["host"] != self.host or not self.frozen(rank, now):
                continue
            with contextlib.suppress(OSError):
                if proc_state(rec["pid"]) in ("T", "t") and Path(f"/proc/{rec['pid']}/cmdline").read_bytes() == mine:
                    os.kill(rec["pid"], signal.SIGKILL)

    @property
    def dump_path(self) -> Path:
        return self.run_dir / "hang" / f"rank{self.env.rank}-{self.host}.txt"

    def dump(self, line: str) -> bool:
        """Every thread's stack (the main thread's too, wherever it is stuck) into run.dir/hang/."""
        path = self.dump_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                beat = self.beat
                f.write(f"{line}\n\nrank {self.env.rank} on {self.host}, pid {self.pid}: phase {beat.phase}, ")
                f.write(f"step {beat.step}, {time.monotonic() - beat.since:.0f} s since its last progress\n")
                kids = forked_children()
                if kids:
                    f.write("loader workers: " + ", ".join(f"pid {p} (state {proc_state(p)})" for p in kids) + "\n")
                f.write("\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            dump_nccl_trace(path.with_name(f"nccl-rank{self.env.rank}-{self.host}.pkl"))
            return True
        except OSError:
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            return False

    def _append_to_log(self, line: str) -> None:
        with contextlib.suppress(OSError):
            with open(self.run_dir / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _exit(self) -> None:
        """Ends this process now, from this thread: the main thread may never return from where it is stuck.
        Loader workers go first (a stopped one would stay stopped forever). The status is recorded for the
        launcher's retry decision first (bfly.retry: a hang is retried, unlike a user error)."""
        record_exit(EXIT_HANG)
        for callback in self.before_exit:
            _bounded(functools.partial(callback, self.declared or "a stop that could not be honoured"), 10)
        for pid in forked_children():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(EXIT_HANG)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def _bounded(fn: Callable[[], None], seconds: float) -> None:
    """Runs `fn` in a thread for at most `seconds` (a report to wandb must not keep a hung job alive)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
