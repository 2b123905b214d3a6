"""The run directory's own bookkeeping: one run at a time (a lock), and the files that describe the run
(config.yaml, config_history.jsonl). Checkpoints are bfly.checkpoint's, logs bfly.runlog's.

The lock is `.bfly.lock`, a small JSON file naming its holder (host, pid, start time, SLURM job). A
second run on the same directory is refused at start-up with one line naming the holder. A lock
whose holder is gone is taken over without a human:
  * same machine: the holder's pid is not running (or is another process now);
  * the same SLURM job (a requeued job keeps its id, and SLURM runs one instance of a job at a time),
    wherever it ran before;
  * another machine (shared file system): the holder refreshes the file's mtime every HEARTBEAT_S;
    a lock not refreshed for STALE_S (node lost) is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bfly.core.env import DistEnv, slurm_job_id

LOCK = ".bfly.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunDirBusy(RuntimeError):
    pass


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: str  # local time, for people
    boot_id: str
    start_ticks: int  # /proc/<pid>/stat start time: tells a recycled pid apart
    slurm_job: str | None

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def this_process(slurm_job: str | None) -> Holder:
    pid = os.getpid()
    return Holder(
        socket.gethostname(), pid, time.strftime("%Y-%m-%d %H:%M:%S %Z"), _boot_id(), _start_ticks(pid), slurm_job
    )


def _alive_here(h: Holder) -> bool:
    try:
        os.kill(h.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return _start_ticks(h.pid) in (h.start_ticks, -1)


def stale_reason(h: Holder, me: Holder, age_s: float) -> str | None:
    """Why the lock of `h` may be taken over by `me`, or None when its holder may still be running."""
    if h.slurm_job and h.slurm_job == me.slurm_job:
        return f"an earlier run of the same SLURM job {h.slurm_job}"
    if h.host == me.host and h.boot_id == me.boot_id:
        return None if _alive_here(h) else f"its holder (pid {h.pid}) is not running"
    if h.host == me.host:
        return "its holder ran before this machine restarted"
    if age_s > STALE_S:
        return f"its holder on {h.host} has not refreshed it for {age_s:.0f} s"
    return None


class RunDirLock:
    """Held by rank 0 for the whole run; released at exit (a kill -9 leaves a lock that is taken over)."""

    def __init__(self, run_dir: Path, me: Holder):
        self.path = run_dir / LOCK
        self.me = me
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when a stale lock was taken over. Raises RunDirBusy."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                note = self._take_over_if_stale()
                if note is None:
                    continue  # the file vanished meanwhile: try again
                self._start_heartbeat()
                return note
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(self.me)))
            self._start_heartbeat()
            return None
        raise RunDirBusy(f"run directory {self.path.parent}: cannot take its lock {self.path}")

    def _take_over_if_stale(self) -> str | None:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = Holder(**json.loads(text))
        except (ValueError, TypeError):
            if age < 10:  # being written right now by another run
                raise RunDirBusy(f"run directory {self.path.parent} is being locked by another run") from None
            holder = None
        why = "it was unreadable" if holder is None else stale_reason(holder, self.me, age)
        if why is None:
            assert holder is not None  # an unreadable lock always has a reason

            raise RunDirBusy(
                f"run directory {self.path.parent} is in use by another run ({holder.describe()}); "
                f"wait for it to end, stop it, or pick another run.dir"
            )
        tmp = self.path.with_name(f"{LOCK}.{self.me.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)
        time.sleep(0.05)
        if self._read() != self.me:  # two runs took it over at once: the last writer holds it
            raise RunDirBusy(f"run directory {self.path.parent} was taken by another run at the same moment")
        old = holder.describe() if holder else "unknown holder"
        return f"took over the lock of {self.path.parent} from {old}: {why}"

    def live_holder(self) -> Holder | None:
        """Who holds the lock now and may still be running (None: free, unreadable or stale); reads only."""
        holder = self._read()
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return None
        return holder if holder and stale_reason(holder, self.me, age) is None else None

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._beat = threading.Thread(target=beat, name="bfly-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._read() == self.me:
            with contextlib.suppress(OSError):
                self.path.unlink()


class StartupRefused(Exception):
    """On ranks other than 0: rank 0 refused the start and prints why."""


def lock_run_dir(run_dir: Path, env: DistEnv) -> RunDirLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it got it (a collective)."""
    from bfly.core import distributed

    lock, error = None, None
    if env.is_main:
        lock = RunDirLock(run_dir, this_process(slurm_job_id()))
        try:
            note = lock.acquire()
            if note:
                print(f"warning: {note}", flush=True)
        except RunDirBusy as e:
            lock, error = None, e
    refused = distributed.all_gather_objects(error is not None)[0]
    if error is not None:
        raise error
    if refused:
        raise StartupRefused()
    return lock


def append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """config_history.jsonl: each accepted change of the config on a resume, with its step."""
    with open(run_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def locked_json(path: Path, indent: int | None = None) -> Iterator[dict[str, Any]]:
    """A run directory's JSON state file (retries.json, suspect_nodes.json), read and rewritten under an
    exclusive lock: several ranks or jobs of a run may update it at once; the update survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        state = json.loads(text) if text.strip() else {}
        yield state
        f.seek(0)
        f.truncate()
        f.write(json.dumps(state, indent=indent) + "\n")
        f.flush()
        os.fsync(f.fileno())
