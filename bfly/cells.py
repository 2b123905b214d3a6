"""Run a list of timed cells under a time budget, leaving figures behind even if the run is cut short.

Made for a lent GPU that is taken back after a fixed time: a cell's rows are printed the moment the
cell ends, the JSON file is rewritten after every cell (a time-out still leaves everything measured
so far), a failing cell prints its traceback on stderr and the next cell runs, and a cell that would
end after the budget (its estimate added to the time already spent) is skipped and says so.
bfly.gpu_check defines the cells; this module knows nothing about GPUs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bfly.throughput import Row, format_table


@dataclass
class Cell:
    key: str  # short name for --cells
    title: str
    estimate_s: float  # planned duration; what the budget is checked against
    run: Callable[[], list[Row]]


@dataclass
class Outcome:
    key: str
    title: str
    estimate_s: float
    status: str = "pending"  # pending | ok | failed | skipped
    seconds: float | None = None
    error: str = ""
    rows: list[Row] = field(default_factory=list)


def plan_lines(cells: list[Cell], budget_s: float) -> list[str]:
    """The plan as printed before anything runs: each cell's estimate and where it ends."""
    lines, end = [], 0.0
    for i, cell in enumerate(cells, 1):
        end += cell.estimate_s
        over = "  <- past the budget: skipped unless earlier cells finish early" if end > budget_s else ""
        lines.append(f"  {i}. {cell.key:<18} ~{cell.estimate_s:4.0f}s  ends ~{end:4.0f}s  {cell.title}{over}")
    lines.append(f"  total ~{end:.0f}s of a {budget_s:.0f}s budget")
    return lines


def planned_total(cells: list[Cell]) -> float:
    return sum(c.estimate_s for c in cells)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a reader (or a time-out) never sees half a file


def outcome_dict(o: Outcome) -> dict[str, Any]:
    return {
        "key": o.key,
        "title": o.title,
        "estimate_s": o.estimate_s,
        "status": o.status,
        "seconds": o.seconds,
        "error": o.error,
        "rows": [asdict(r) for r in o.rows],
    }


def run_cells(
    cells: list[Cell], budget_s: float, json_path: Path, header: Callable[[list[Outcome]], dict[str, Any]]
) -> list[Outcome]:
    """Run `cells` in order. `header(outcomes)` gives the JSON's other fields (rewritten each time)."""
    outcomes = [Outcome(c.key, c.title, c.estimate_s) for c in cells]

    def save(finished: bool) -> None:
        write_json_atomic(
            json_path,
            header(outcomes)
            | {"budget_s": budget_s, "finished": finished, "cells": [outcome_dict(o) for o in outcomes]},
        )

    save(False)
    start = time.perf_counter()
    for cell, out in zip(cells, outcomes):
        elapsed = time.perf_counter() - start
        if elapsed + cell.estimate_s > budget_s:
            out.status = "skipped"
            out.error = f"{elapsed:.0f}s spent + ~{cell.estimate_s:.0f}s estimated > budget {budget_s:.0f}s"
            print(f"\n== {cell.key}: skipped ({out.error})", flush=True)
            save(False)
            continue
        print(f"\n== {cell.key}: {cell.title} (at {elapsed:.0f}s, ~{cell.estimate_s:.0f}s)", flush=True)
        t = time.perf_counter()
        try:
            out.rows = cell.run()
            out.status = "ok"
        except Exception as e:
            out.status = "failed"
            out.error = f"{type(e).__name__}: {str(e).strip()[:500]}"
            print(f"bfly: cell {cell.key} failed, traceback:", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
        out.seconds = round(time.perf_counter() - t, 1)
        if out.rows:
            print(format_table(out.rows), flush=True)
        print(
            f"-- {cell.key}: {out.status} in {out.seconds:.0f}s (estimated {cell.estimate_s:.0f}s)"
            + (f": {out.error.splitlines()[0]}" if out.error else ""),
            flush=True,
        )
        save(False)
    save(True)
    return outcomes


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


def format_verdict(checks: list[Check]) -> str:
    width = max([len(c.target) for c in checks] + [6])
    lines = [f"{'target':<{width}}  {'measured':<28}  verdict", "-" * (width + 40)]
    lines += [f"{c.target:<{width}}  {c.measured[:28]:<28}  {c.verdict}" for c in checks]
    return "\n".join(lines)
