"""A record of every attempt of a run: `run.dir/attempts.jsonl`, what a teammate needs to trust a result.

Each start of a job on a run directory (first run, resume, requeue, torchrun restart) appends one
`start` line once the start-up checks have passed: time, hosts, world size, SLURM job/array/restart ids,
torchrun's restart count, the command line, bfly's version and git commit (dirty or not) when run from a
checkout, the library versions, the GPU model, where training starts, and how the previous attempt
ended. Each job appends one `end` line when it ends (finished, budget, signal, hang, user error, crash)
with the global step reached; an attempt with no `end` line was killed (SIGKILL, out of memory, a lost
node) or crashed before it could write one, and is reported as a crash. Rank 0 writes; every rank
contributes its host and GPU.

For the time accounting (bfly.run.goodput): both lines carry `unix_time`; the start line the process's
start time (`process_start`), SLURM's start time of the allocation (`slurm_start_time`, ends a requeued
job's wait in the queue) and how far the previous attempt got (`previous_progress`: its first and latest
logged steps, from progress.json); the end line this attempt's `progress`, and after a hang `stalled_s`,
the seconds from the last progress to the hang's verdict.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bfly.core import distributed
from bfly.core.env import DistEnv, launch_ids, slurm_job_start_time
from bfly.core.errors import one_line
from bfly.run.outcome import Outcome
from bfly.run.runlog import ATTEMPTS, read_attempts as read, read_progress

FILE = ATTEMPTS
FINISHED, BUDGET, SIGNAL, HANG, USER_ERROR, CRASH = "finished", "budget", "signal", "hang", "user error", "crash"
NO_RECORD = "crash (no end record: killed, or the node was lost)"
# The watchdog's hang line says how long the job went without progress before it was declared hung.
STALLED = re.compile(r"no rank has made progress for (\d+(?:\.\d+)?) s")


def ended(attempt: dict[str, Any]) -> str:
    """How an attempt ended, from its own end record."""
    end = attempt.get("end")
    return end["ended"] if end else NO_RECORD


def _append(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_start() -> float | None:
    """When this process started (unix time, Linux): its start-up began then, before Python's imports."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def _version(package: str) -> str | None:
    """An installed package's version without importing it (timm is imported lazily)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():  # an installed package: no commit to name
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version() -> dict[str, Any]:
    """bfly's version, and its git commit and whether tracked files differ from it, when run from a checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": _version("bfly"), "commit": commit, "dirty": None if status is None else bool(status)}


def library_versions(device: torch.device) -> dict[str, str | None]:
    cuda = device.type == "cuda"
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        with contextlib.suppress(Exception):  # a build without NCCL
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "cuda": torch.version.cuda,  # the CUDA torch was built with
        "cudnn": None if cudnn is None else str(cudnn),
        "nccl": nccl,
    }


def _where(device: torch.device) -> dict[str, str | None]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"host": socket.gethostname(), "gpu": gpu}


def start_record(
    run_dir: Path, env: DistEnv, device: torch.device, epoch: int, global_step: int
) -> dict[str, Any] | None:
    """Collective (every rank's host and GPU); rank 0 appends the start line and returns it."""
    where = distributed.all_gather_objects(_where(device))
    if not env.is_main:
        return None
    before = read(run_dir)
    previous = before[-1] if before else None
    record = {
        "event": "start",
        "attempt": previous["attempt"] + 1 if previous else 1,
        "time": _now(),
        "unix_time": time.time(),
        "process_start": process_start(),
        "slurm_start_time": slurm_job_start_time(),
        "hosts": list(dict.fromkeys(w["host"] for w in where)),
        "world_size": env.world_size,
        **launch_ids(),
        "command": list(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
        "bfly": code_version(),
        "versions": library_versions(device),
        "device": device.type,
        "gpus": sorted({w["gpu"] for w in where if w["gpu"]}),
        "start_epoch": epoch,
        "start_step": global_step,
        "previous_ended": ended(previous) if previous else None,
        # How far the previous attempt got (its first and latest logged steps), read before this one logs.
        "previous_progress": read_progress(run_dir, previous.get("unix_time", 0)) if previous else None,
    }
    _append(run_dir, record)
    return record


def how_ended(
    outcome: Outcome | None, error: BaseException | None, user_errors: tuple[type[BaseException], ...]
) -> tuple[str, str | None]:
    """(how, detail) of a job from its Outcome or the exception that ended it."""
    if error is not None:
        return (USER_ERROR if isinstance(error, user_errors) else CRASH), one_line(error)
    if outcome is None:
        return CRASH, None
    if outcome.finished:
        return FINISHED, None
    return (SIGNAL if outcome.by_signal else BUDGET), outcome.stopped_by


@dataclass
class Attempt:
    """This job's attempt: rank 0 appends its end line when the job ends."""

    run_dir: Path
    number: int | None  # None: not rank 0
    outcome: Outcome | None = None
    started: float = 0.0  # the unix time of its start record

    def end(self, how: str, detail: str | None, global_step: int) -> None:
        if self.number is None:
            return
        record = {
            "event": "end",
            "attempt": self.number,
            "time": _now(),
            "unix_time": time.time(),
            "ended": how,
            "global_step": global_step,
            "progress": read_progress(self.run_dir, self.started),
        }
        if detail:
            record["detail"] = detail
        if how == HANG and detail and (stalled := STALLED.search(detail)):
            record["stalled_s"] = float(stalled[1])  # its last progress came that long before this end
        _append(self.run_dir, record)


@contextlib.contextmanager
def recorded(
    run_dir: Path, env: DistEnv, device: torch.device, state: Any, user_errors: tuple[type[BaseException], ...]
) -> Iterator[Attempt]:
    """Appends this attempt's start line now and its end line when the block ends: set `attempt.outcome`
    before leaving it; an exception is recorded as a user error (`user_errors`) or a crash. `state`: the
    TrainState (its position at the start and at the end). A job ended by the hang watchdog records
    itself with `Attempt.end(HANG, ...)` where it can, else it is a crash with no end record."""
    record = start_record(run_dir, env, device, state.epoch, state.global_step)
    attempt = Attempt(run_dir, record["attempt"] if record else None, started=record["unix_time"] if record else 0.0)
    error: BaseException | None = None
    try:
        yield attempt
    except BaseException as e:
        error = e
        raise
    finally:
        how, detail = how_ended(attempt.outcome, error, user_errors)
        attempt.end(how, detail, state.global_step)


# --- the history table (bfly.report) ----------------------------------------------------------------------


def _restarts(a: dict[str, Any]) -> str:
    parts = []
    if a.get("slurm_restart_count") not in (None, "0"):
        parts.append(f"requeue {a['slurm_restart_count']}")
    if a.get("torchrun_restart_count") not in (None, "0"):
        parts.append(f"torchrun {a['torchrun_restart_count']}")
    return ", ".join(parts) or "–"


def _job(a: dict[str, Any]) -> str:
    if a.get("slurm_array_job_id"):
        return f"{a['slurm_array_job_id']}_{a.get('slurm_array_task_id')}"
    return a.get("slurm_job_id") or "–"


def _code(a: dict[str, Any]) -> str:
    code = a.get("bfly") or {}
    text = code.get("version") or "?"
    if code.get("commit"):
        text += f" {code['commit'][:10]}" + (" (dirty)" if code.get("dirty") else "")
    return text


def history_table(run_dir: Path) -> str | None:
    """The attempt history of a run as a markdown table, or None when it has no attempts.jsonl."""
    attempts = read(run_dir)
    if not attempts:
        return None
    lines = [
        "| # | started (UTC) | hosts | ranks | SLURM job | restart | bfly | torch | device | from step | ended | at step |",
        "|---:|---|---|---:|---|---|---|---|---|---:|---|---:|",
    ]
    for i, a in enumerate(attempts):
        end = a["end"]
        how = ended(a) if end or i < len(attempts) - 1 else "no end record (running, or killed)"
        if end and end.get("detail"):
            how += f" ({end['detail'][:60]})"
        versions = a.get("versions") or {}
        device = ", ".join(a.get("gpus") or []) or a.get("device", "?")
        lines.append(
            f"| {a['attempt']} | {a['time'].replace('+00:00', '')} | {', '.join(a.get('hosts', []))} | "
            f"{a.get('world_size')} | {_job(a)} | {_restarts(a)} | {_code(a)} | {versions.get('torch')} | "
            f"{device} | {a.get('start_step')} | {how} | {end['global_step'] if end else '–'} |"
        )
    return "\n".join(lines)
