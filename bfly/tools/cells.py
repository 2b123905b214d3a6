"""Run a list of timed cells under a hard time budget, leaving figures behind whatever happens.

Made for a GPU node's acceptance run that must end within a fixed time: the budget counts from the
process's start (interpreter and imports included) and keeps a margin for the verdict. A cell runs
only if its estimate fits in the time left, and never longer than that time (nor twice its estimate
and 30 s): an alarm interrupts it, and if it does not return to Python within a grace period (a call
stuck in C), a guard thread writes the JSON, calls `finish` and ends the process. A cell's rows are printed
the moment it ends, the JSON file is rewritten after every cell and whenever a cell reports partial
rows (a time-out still leaves everything measured so far), a failing cell prints its traceback on
stderr and the next cell runs. bfly.gpu_check defines the cells; this module knows nothing about GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bfly.tools.throughput import Row, format_table

VERDICT_MARGIN_S = 10.0  # kept at the end of the budget for the verdict and the last JSON
GRACE_S = 10.0  # how long an interrupted cell may take to return before its guard ends the process


class CellTimeout(BaseException):
    """Raised inside a cell when its time is up (not an Exception: a cell's own error handling must not
    swallow it)."""


@dataclass
class Cell:
    key: str  # short name for --cells
    title: str
    estimate_s: float  # planned duration; what the budget is checked against
    run: Callable[[CellRun], list[Row]]
    max_s: float | None = None  # the longest it may run, budget permitting (default: 2 x estimate + 30 s)

    def limit_s(self) -> float:
        """A hung cell costs the later cells little."""
        return 2 * self.estimate_s + 30 if self.max_s is None else self.max_s


@dataclass
class CellOutcome:
    """How a cell went: its status, its rows, and how long it ran."""

    key: str
    title: str
    estimate_s: float
    status: str = "pending"  # pending | running | ok | failed | timeout | stopped | skipped
    seconds: float | None = None
    error: str = ""
    rows: list[Row] = field(default_factory=list)
    limit_s: float | None = None  # the time the cell was given


class CellRun:
    """What a running cell may ask: its time left (for its child processes' timeouts), and to leave
    partial rows that are kept (and written to the JSON at once) if it is cut short."""

    def __init__(self, deadline: float, on_partial: Callable[[list[Row]], None]):
        self.deadline, self._on_partial = deadline, on_partial

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def partial(self, rows: list[Row]) -> None:
        self._on_partial(rows)


def process_age_s() -> float:
    """Seconds since this process started (Linux: from /proc); 0 where it cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def plan_lines(cells: list[Cell], budget_s: float, startup_s: float = 0.0) -> list[str]:
    """The plan as printed before anything runs: each cell's estimate and where it ends."""
    usable = budget_s - VERDICT_MARGIN_S
    lines, end = [f"  start-up  {startup_s:4.0f}s so far (counted)"], startup_s
    for i, cell in enumerate(cells, 1):
        end += cell.estimate_s
        over = "  <- past the budget: skipped unless earlier cells finish early" if end > usable else ""
        lines.append(f"  {i}. {cell.key:<18} ~{cell.estimate_s:4.0f}s  ends ~{end:4.0f}s  {cell.title}{over}")
    lines.append(
        f"  total ~{end:.0f}s of a {budget_s:.0f}s budget ({VERDICT_MARGIN_S:.0f}s kept for the verdict); "
        "each cell is stopped when its time is up"
    )
    return lines


def planned_total(cells: list[Cell]) -> float:
    return sum(c.estimate_s for c in cells)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a reader (or a time-out) never sees half a file


def outcome_dict(o: CellOutcome) -> dict[str, Any]:
    return {
        "key": o.key,
        "title": o.title,
        "estimate_s": o.estimate_s,
        "limit_s": o.limit_s,
        "status": o.status,
        "seconds": o.seconds,
        "error": o.error,
        "rows": [asdict(r) for r in o.rows],
    }


def _raise_timeout(signum: int, frame: object) -> None:
    raise CellTimeout


class Ledger:
    """The cells' outcomes and the JSON file that holds them; the main thread and a cell's guard thread
    both write it."""

    def __init__(
        self,
        cells: list[Cell],
        budget_s: float,
        json_path: Path,
        header: Callable[[list[CellOutcome]], dict[str, Any]],
        finish: Callable[[list[CellOutcome]], None],
        started: float,
    ):
        self.outcomes = [CellOutcome(c.key, c.title, c.estimate_s) for c in cells]
        self.budget_s, self.json_path, self.started = budget_s, json_path, started
        self._header, self._finish = header, finish
        self._lock = threading.Lock()

    def save(self, finished: bool = False) -> None:
        with self._lock:
            data = self._header(self.outcomes) | {
                "budget_s": self.budget_s,
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "finished": finished,
                "cells": [outcome_dict(o) for o in self.outcomes],
            }
            write_json_atomic(self.json_path, data)

    def conclude(self) -> None:
        """The last JSON and the verdict, whatever happened."""
        self.save(True)
        self._finish(self.outcomes)

    def stopped(self, e: BaseException) -> None:
        for out in self.outcomes:
            if out.status in ("pending", "running"):
                out.status, out.error = ("stopped", f"run stopped ({type(e).__name__})")


def run_cells(
    cells: list[Cell],
    budget_s: float,
    json_path: Path,
    header: Callable[[list[CellOutcome]], dict[str, Any]],
    finish: Callable[[list[CellOutcome]], None] = lambda outcomes: None,
    on_abort: Callable[[], None] = lambda: None,
    started: float | None = None,
) -> list[CellOutcome]:
    """Run `cells` in order (from the main thread). `header(outcomes)` gives the JSON's other fields;
    `finish(outcomes)` prints the verdict, once, whatever happens; `on_abort` ends what a stuck cell
    started (child processes) before the guard exits. `started`: time.monotonic() of the process's
    start (default: now minus its age)."""
    started = time.monotonic() - process_age_s() if started is None else started
    end = started + budget_s - VERDICT_MARGIN_S  # cells end by then
    ledger = Ledger(cells, budget_s, json_path, header, finish, started)
    done = threading.Event()
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    ledger.save(False)
    try:
        for cell, out in zip(cells, ledger.outcomes):
            now = time.monotonic()
            if _skipped(cell, out, now, end, ledger):
                continue
            out.limit_s = round(min(end - now, cell.limit_s()), 1)
            print(
                f"\n== {cell.key}: {cell.title} (at {now - started:.0f}s, ~{cell.estimate_s:.0f}s, "
                f"stopped after {out.limit_s:.0f}s)",
                flush=True,
            )

            def partial(rows: list[Row], out: CellOutcome = out) -> None:
                out.rows = list(rows)
                ledger.save(False)

            _run_one(cell, out, CellRun(now + out.limit_s, partial), ledger, on_abort, done)
    except BaseException as e:  # SIGTERM (SystemExit) or ^C: the running cell is marked, the verdict still written
        ledger.stopped(e)
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ledger.conclude()
    return ledger.outcomes


def _skipped(cell: Cell, out: CellOutcome, now: float, end: float, ledger: Ledger) -> bool:
    """A cell whose estimate does not fit in the time left is skipped, and says why."""
    if cell.estimate_s <= end - now:
        return False
    out.status = "skipped"
    out.error = (
        f"{now - ledger.started:.0f}s spent + ~{cell.estimate_s:.0f}s estimated > budget {ledger.budget_s:.0f}s "
        f"less {VERDICT_MARGIN_S:.0f}s for the verdict"
    )
    print(f"\n== {cell.key}: skipped ({out.error})", flush=True)
    ledger.save(False)
    return True


def _guard(
    cell: Cell, out: CellOutcome, run: CellRun, ledger: Ledger, on_abort: Callable[[], None], done: threading.Event
) -> None:
    """Ends the check when the cell is stuck where the alarm cannot reach it (a C call): the JSON and the
    verdict are written, what the cell started is ended, and the process exits 1."""
    t = time.monotonic()

    def guard() -> None:
        if done.wait(run.left() + GRACE_S):
            return
        out.status, out.seconds = "timeout", round(time.monotonic() - t, 1)
        out.error = f"still running {GRACE_S:.0f}s after its {out.limit_s:.0f}s; the check was ended"
        print(f"bfly: cell {cell.key} did not stop at its time limit; ending the check", file=sys.stderr, flush=True)
        on_abort()
        ledger.conclude()
        os._exit(1)

    threading.Thread(target=guard, name=f"guard-{cell.key}", daemon=True).start()


def _run_one(
    cell: Cell, out: CellOutcome, run: CellRun, ledger: Ledger, on_abort: Callable[[], None], done: threading.Event
) -> None:
    out.status = "running"
    ledger.save(False)
    t = time.monotonic()
    done.clear()
    _guard(cell, out, run, ledger, on_abort, done)
    signal.setitimer(signal.ITIMER_REAL, max(run.left(), 0.001))
    try:
        out.rows = cell.run(run) or out.rows
        out.status = "ok"
    except CellTimeout:
        out.status = "timeout"
        out.error = f"stopped at its time limit ({out.limit_s:.0f}s)" + (": partial rows kept" if out.rows else "")
    except Exception as e:
        # A cell's own wait that ran out at its deadline (a child's timeout) is a time-out too.
        out.status = "timeout" if run.left() == 0 else "failed"
        out.error = f"{type(e).__name__}: {str(e).strip()[:500]}"
        print(f"bfly: cell {cell.key} failed, traceback:", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        done.set()
    out.seconds = round(time.monotonic() - t, 1)
    if out.rows:
        print(format_table(out.rows), flush=True)
    print(
        f"-- {cell.key}: {out.status} in {out.seconds:.0f}s (estimated {cell.estimate_s:.0f}s)"
        + (f": {out.error.splitlines()[0]}" if out.error else ""),
        flush=True,
    )
    ledger.save(False)


@dataclass
class Check:
    """One line of the verdict table."""

    target: str
    measured: str
    verdict: str  # PASS | FAIL | MISSING


def check(target: str, value: float | None, ok: Callable[[float], bool], fmt: str, why_missing: str = "") -> Check:
    if value is None:
        failed = why_missing.startswith(("FAILED", "cell failed"))
        return Check(target, why_missing or "not measured", "FAIL" if failed else "MISSING")
    return Check(target, format(value, fmt), "PASS" if ok(value) else "FAIL")


def at_least(bound: float) -> Callable[[float], bool]:
    return lambda value: value >= bound


def format_verdict(checks: list[Check]) -> str:
    width = max([len(c.target) for c in checks] + [6])
    lines = [f"{'target':<{width}}  {'measured':<28}  verdict", "-" * (width + 40)]
    lines += [f"{c.target:<{width}}  {c.measured[:28]:<28}  {c.verdict}" for c in checks]
    return "\n".join(lines)
