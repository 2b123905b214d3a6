"""The exit contract of bfly's commands: every exit status, which errors are the user's, and where a
trainer leaves its status for the launcher's retry decision (bfly.retry).

    0   finished (or a run.stop_after_* budget reached)
    1   a crash: a bug, a failed collective
    2   a user error: config, data, run directory, checkpoint (one line names the culprit)
    75  stopped by a signal with the checkpoint written (run.stopped_exit_code; run again to resume)
    76  a hang: a rank made no progress for run.hang_timeout_s (bfly.job.watchdog)
    77  a node failed the node check before training (bfly.job.nodecheck)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from bfly.core import env as environ
from bfly.core.checkpoint import CheckpointError
from bfly.core.config import ConfigError
from bfly.core.data.metadata import DataError
from bfly.run.rundir import RunDirBusy

EXIT_OK = 0
EXIT_CRASH = 1  # a bug, a failed collective
EXIT_USER_ERROR = 2  # config, data, run directory, checkpoint: one line names the culprit

# A trainer stopped by a signal after writing its checkpoint (sysexits.h EX_TEMPFAIL: "try again later"):
# a script tells it apart from a crash (1) and a user error (2). Run it again to resume.
EXIT_STOPPED = 75

# A job ended because a rank stopped making progress (a hang): not a user error (2), so a launcher may
# retry it from the last checkpoint, and told apart from a crash (1) in the job's log.
EXIT_HANG = 76

# A node of the job failed the node check (bfly.job.nodecheck) before training: the job ends, or is requeued
# away from that node (bfly.job.ledger).
EXIT_NODE_CHECK = 77

# The errors that are the user's to fix (exit 2): retrying would fail the same way.
USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirBusy)


def record_exit(status: int, cause: str | None = None) -> None:
    """A trainer's exit status, where the launcher reads it (BFLY_EXIT_STATUS_DIR; unset: not recorded),
    with its cause where the trainer knows it (a hang: the rank the watchdog named, not this one).
    A trainer killed by a signal records nothing: the launcher counts that as a crash. A process records once:
    its first decided status stands (a user error recorded before the process group closes is not turned
    into another status by what happens while it exits)."""
    where = environ.exit_status_dir()
    if where is None:
        return
    rank = environ.dist_env().rank
    restart = environ.restart_count()[0]
    # One file per rank and torchrun round: a restarted trainer reads the previous round's while the
    # fastest trainer of its own round may already have written its own.
    path = where / f"rank-{rank}.restart-{restart}.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text())["pid"] == os.getpid():
            return
    record = {
        "status": status,
        "rank": rank,
        "host": socket.gethostname(),
        "node": environ.slurm_node_name(),  # the node as SLURM names it (host names need not be)
        "pid": os.getpid(),
        "restart": restart,
        "time": time.time(),
        "error": _error_line(),
    }
    if cause:
        record["cause"] = cause
    with contextlib.suppress(OSError):  # a full or read-only disk must not hide the real exit status
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".rank-{rank}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(path)


def _error_line() -> str | None:
    """The failure this trainer wrote for torchrun's summary (bfly.core.errors.recorded), if any: what a
    hardware-looking crash is recognised by."""
    path = environ.elastic_error_file()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads(path.read_text())["message"]["message"])[:300] if path else None
    return None
