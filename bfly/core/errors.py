"""One line for an error message: what every command prints for a user error; bfly's warnings as one
line; a failure recorded for torchrun's summary."""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PREFIXES = ("bfly.", "DataError")
_PACKAGE = Path(__file__).resolve().parents[1]  # the bfly package


def one_line(e: BaseException | str, first: bool = False) -> str:
    """A message on one line. By default its last non-empty line: a DataLoader worker's error arrives
    with the worker's traceback in its message, and the cause is at the end (its "bfly....Error: "
    prefix is dropped). first=True keeps the first line instead, for errors that explain themselves
    first and add detail after (torch.load's)."""
    text = e if isinstance(e, str) else str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "" if isinstance(e, str) else type(e).__name__
    if first:
        return lines[0]
    last = lines[-1]
    return last.split("Error: ", 1)[1] if last.startswith(_PREFIXES) and "Error: " in last else last


def release_frames(e: BaseException) -> None:
    """Frees what the finished frames of e's traceback hold: a data loader and its worker processes, a
    model. torch re-raises a loader worker's error from a frame that the error's own traceback holds, a
    cycle that only the garbage collector would break, minutes later in a long-lived process."""
    traceback.clear_frames(e.__traceback__)


@functools.cache  # once per process: each call would wrap the formatter again
def one_line_warnings() -> None:
    """bfly's own warnings print as `warning: <message>`: Python's format adds the file, line number,
    category and the source line of the warnings.warn call, which tell a user nothing. Warnings of
    other packages keep Python's format."""
    python_format = warnings.formatwarning

    def formatwarning(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        if Path(filename).resolve().is_relative_to(_PACKAGE):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


@dataclass(frozen=True)
class Failure:
    """Why a process exits with a non-zero status, for the launcher's summary of the job."""

    line: str  # the one line printed (or, for a bug, its exception)
    traceback: str | None = None  # a bug's: kept in the summary
    follows: bool = False  # this rank stopped because another rank failed first
    at: float = field(default_factory=time.time)  # when it was met


def first_to_say(error_file: Path | None, is_main: bool) -> bool:
    """Whether this rank prints a start-up error (one met before the process group exists). Such an
    error is the same on every rank, and torchrun ends the other ranks as soon as one has exited: the
    first rank to meet it says it, once. The ranks of one torchrun agent share the folder of their error
    files' folders (one per attempt), where the first claims the line; without it, rank 0 says it."""
    if error_file is None:
        return is_main
    try:
        os.close(os.open(error_file.parent.parent / "bfly-startup-error", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return is_main
    return True


def write_error_file(path: Path, failure: Failure) -> None:
    """The elastic error file torchrun's agent reads when a worker fails (the format of
    torch.distributed.elastic.multiprocessing.errors.ErrorHandler): its failure summary shows
    `py_callstack` as the worker's "traceback", and calls the failure with the earliest `timestamp`
    the root cause. Without the file the summary says only "To enable traceback see: ..."."""
    # The stamps are whole seconds and a tie goes to the lowest rank: a rank that stopped because another
    # failed is stamped a second later, so that the rank that met the error is named the root cause.
    stamp = int(failure.at) + (1 if failure.follows else 0)
    record = {
        "message": {
            "message": failure.line,
            "extraInfo": {"py_callstack": failure.traceback or failure.line, "timestamp": str(stamp)},
        }
    }
    try:
        path.write_text(json.dumps(record))
    except OSError:
        pass  # the summary then says less; the error itself is printed already


def recorded(job: Callable[[], tuple[int, Failure | None]], error_file: Path | None) -> int:
    """Runs a command's job and returns its exit status. Under torchrun (`error_file`, from
    bfly.core.env.elastic_error_file) the job's failure is written for torchrun's summary; a bug keeps its
    traceback there, and is raised as before."""
    try:
        code, failure = job()
    except Exception as e:
        if error_file:
            write_error_file(error_file, Failure(f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise
    if failure and error_file:
        write_error_file(error_file, failure)
    return code
