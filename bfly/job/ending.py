"""How the watchdog ends a process: its stacks written, stopped peers and loader workers killed, and
os._exit(EXIT_HANG) from the watchdog's thread (the main thread may never return from where it is stuck).

Processes are seen through /proc (Linux); elsewhere these find nothing and end nothing but this process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from bfly.job import retry
from bfly.job.exits import EXIT_HANG, record_exit
from bfly.job.heartbeat import Heartbeat


def proc_state(pid: int) -> str | None:
    """The state letter of a local process (R, S, D, T, Z, ...), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def forked_children(pid: int | None = None, cmdline: bytes | None = None) -> list[int]:
    """This process's forked children (DataLoader workers: same command line), from /proc; or `pid`'s
    children with command line `cmdline`."""
    pid = pid or os.getpid()
    try:
        cmdline = cmdline or Path(f"/proc/{pid}/cmdline").read_bytes()
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


def local_trainers(rank: int, world_size: int) -> dict[int, int]:
    """rank -> pid of this job's trainers on this host (this process's siblings under torchrun's agent:
    same parent, same command line, their RANK from /proc/<pid>/environ), this one included."""
    try:
        mine = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return {}
    found = {rank: os.getpid()}
    for pid in forked_children(os.getppid(), mine):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=") and e[5:].isdigit()]
        if ranks and ranks[-1] < world_size:
            found.setdefault(ranks[-1], pid)
    return found


def write_stacks(path: Path, line: str, beat: Heartbeat, who: str) -> bool:
    """Every thread's stack (the main thread's too, wherever it is stuck) into `path`, after `line` and
    the heartbeat's state. who: "rank R on HOST, pid P".
    False (the stacks then go to stderr) when the file cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{line}\n\n{who}: phase {beat.phase}, ")
            f.write(f"step {beat.step}, {time.monotonic() - beat.since:.0f} s since its last progress\n")
            kids = forked_children()
            if kids:
                f.write("loader workers: " + ", ".join(f"pid {p} (state {proc_state(p)})" for p in kids) + "\n")
            f.write("\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        return True
    except OSError:
        if (err := stderr_with_fd()) is not None:
            faulthandler.dump_traceback(err, all_threads=True)
        return False


def stderr_with_fd() -> TextIO | None:
    """The process's stderr as faulthandler needs it, a file descriptor: sys.stderr, or the original one
    where sys.stderr was replaced by an object without one (a test runner's capture, a notebook)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None and stream.fileno() >= 0:
                return stream
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
            continue
    return None


def kill_stopped(pids: Iterable[int]) -> None:
    """SIGKILL to those of `pids` that are stopped trainers of this job (state T, same command line as
    this process): a stopped process can run nothing, not even a signal handler, and its launcher would
    wait 30 s more (torchrun) or forever (a plain process)."""
    try:
        mine = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(OSError):
            if proc_state(pid) in ("T", "t") and Path(f"/proc/{pid}/cmdline").read_bytes() == mine:
                os.kill(pid, signal.SIGKILL)


def exit_hang(before_exit: list[Callable[[str], None]], line: str, cause: str, run_dir: Path | None = None) -> None:
    """Ends this process now with EXIT_HANG. The status is recorded for the launcher's retry decision
    first (bfly.retry: a hang is retried, unlike a user error), with its cause ("hang on rank 1 (host) at
    step 4"), and in `run_dir` by the rank that reported the hang; then `before_exit` is told `line`.
    Loader workers go before this process (a stopped one would stay stopped forever)."""
    record_exit(EXIT_HANG, cause)
    if run_dir is not None:
        retry.record_hang(run_dir, cause)
    for callback in before_exit:  # a launcher's requeue (scontrol) among them: seconds, not minutes
        bounded(functools.partial(callback, line), 30)
    for pid in forked_children():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_HANG)


def bounded(fn: Callable[[], None], seconds: float) -> None:
    """Runs `fn` in a thread for at most `seconds` (a report to wandb must not keep a hung job alive)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
