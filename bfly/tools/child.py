"""Child processes started one way by the GPU check and by the tests: a command (python, a module or a
script) from the repository root, the repository first on PYTHONPATH, its output captured, bounded by a
time limit, in a process group of its own; at its end every process it started is killed and what
outlived it is named.

    with Child([sys.executable, "-m", "bfly.train", ...], log=out / "job.log") as child:
        child.wait_for(r"^epoch 1/1 step 3/", timeout=60)
        child.signal_group(signal.SIGTERM)
        code = child.wait(120)

`run(cmd, timeout)` is the same for a command run to its end with stdout and stderr kept apart
(subprocess.run's result). Processes are found through /proc (Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
_Self = TypeVar("_Self", bound="Child")


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with the repository first on PYTHONPATH, unbuffered
    output and wandb off, then `extra`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: state, ppid, pgrp, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _processes() -> list[tuple[int, list[str]]]:
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    return [(int(e), stat) for e in entries if (stat := _stat(e))]


def children(pid: int) -> list[int]:
    return [p for p, stat in _processes() if int(stat[1]) == pid]


def descendants(pid: int) -> list[int]:
    out = []
    for kid in children(pid):
        out += [kid, *descendants(kid)]
    return out


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    return [p for p, stat in _processes() if int(stat[2]) == pgid and stat[0] != "Z"]


def end_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL to every process `proc` started: its descendants by pid first (while they are still its own,
    so no pid is a recycled one; torchrun's workers lead sessions of their own), then `proc`, then its
    process group (what was orphaned). Returns the pids of the group that had outlived `proc`."""
    left = group_members(proc.pid) if proc.poll() is not None else []
    for pid in descendants(proc.pid) if proc.poll() is None else []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return left


def run(cmd: list[str], timeout: float, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cmd` from the repository root to its end, stdout and stderr captured apart, in its own process
    group; past `timeout` (subprocess.TimeoutExpired) and at its end every process it started is killed."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env() if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=os.setpgrp,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        end_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Child:
    """A command from the repository root, leading a process group of its own in this Unix session (so
    whatever ends the session ends it too; a signal to the group reaches torchrun, the trainers it forwards
    signals to, and loader workers, as `timeout` or a batch system sends it), its stdout and stderr merged
    and collected line by line with their arrival times, also into `log` and to `on_line` when given.
    tty=True: on a pseudo-terminal, as its foreground job, so `ctrl_c` is a real Ctrl-C. Leaving the
    `with` block, or `end()`, kills whatever is still running."""

    def __init__(
        self,
        cmd: list[str],
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        tty: bool = False,
    ):
        self.cmd, self.log, self._on_line = cmd, log, on_line
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.master: int | None = None
        self.proc: subprocess.Popen[Any]  # text on a pipe, bytes on a pseudo-terminal
        env = child_env() if env is None else dict(env)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        if tty:
            self.master, slave = os.openpty()
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=_take_terminal,
            )  # fmt: skip
            os.close(slave)
            self._reader = threading.Thread(target=self._read_tty, daemon=True)
        else:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=os.setpgrp,
            )  # fmt: skip
            self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def _add(self, line: str) -> None:
        self.lines.append((time.monotonic() - self.t0, line))
        if self._on_line:
            self._on_line(line)

    def _read(self) -> None:
        assert self.proc.stdout is not None  # stdout=PIPE
        with open(self.log, "w") if self.log else contextlib.nullcontext() as f:
            for line in self.proc.stdout:
                if f:
                    f.write(line)
                    f.flush()
                self._add(line.rstrip("\n"))

    def _read_tty(self) -> None:
        assert self.master is not None
        buffer = b""
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *done, buffer = re.split(rb"\r\n|\r|\n", buffer)
            for raw in done:
                text = raw.decode(errors="replace").replace("\x1b[K", "")
                if text:
                    self._add(text)
        if buffer:
            self._add(buffer.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def _see(self) -> str:
        return f"; see {self.log}" if self.log else ""

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match:
        """The first output line matching `pattern` (searched), waiting up to `timeout` seconds for it: past
        that the command is killed (TimeoutError); RuntimeError if it exits before printing one."""
        rx, i, end = re.compile(pattern), 0, time.monotonic() + timeout
        while True:
            while i < len(self.lines):
                m = rx.search(self.lines[i][1])
                i += 1
                if m:
                    return m
            if self.proc.poll() is not None:
                self._reader.join(5)
                if i >= len(self.lines):
                    raise RuntimeError(
                        f"exited with code {self.proc.returncode} before a line matching {rx.pattern!r}{self._see()}"
                    )
            elif time.monotonic() > end:
                self.end()
                raise TimeoutError(f"no line matching {rx.pattern!r} within {timeout:.0f}s{self._see()}")
            time.sleep(0.02)

    def wait(self, timeout: float, every_s: float = 5.0, tick: Callable[[], None] = lambda: None) -> int:
        """The exit status, waiting up to `timeout` seconds: past that the command is killed (TimeoutError).
        `tick` is called every `every_s` seconds while waiting (partial results)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                code = self.proc.wait(min(every_s, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    self.end()
                    raise TimeoutError(f"still running after {timeout:.0f}s, killed{self._see()}") from None
                tick()
        self._reader.join(10)
        return code

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def ctrl_c(self) -> None:
        """A Ctrl-C typed on its terminal (tty=True): SIGINT to the foreground process group."""
        assert self.master is not None, "Ctrl-C needs tty=True"
        os.write(self.master, b"\x03")

    def end(self) -> list[int]:
        """Kills every process the command started; returns those of its group that had outlived it."""
        return end_tree(self.proc)


def _take_terminal() -> None:
    """In the child, after setsid: make stdin (the pty) its controlling terminal, as a shell does."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
