"""The floors of the code: imports point inward only, and no module imports itself back through others.

    bfly/core   the training core: config, environment, models, data, engine, assembly, checkpoint format
    bfly/run    one run around the core: the loop and its components, resume, logging sinks
    bfly/job    one job around the run: the command line, exit contract, signals, watchdog, retry
    bfly/tools  beside the trainer: evaluate, predict, export, report, benchmarks, the GPU check
    launch/     submits jobs (SLURM, submitit)
    bfly/X.py   `python -m bfly.X`: a command's entry point, nothing else

Every import counts, those inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What each floor may import (besides itself).
MAY_IMPORT = {
    "core": set(),
    "run": {"core"},
    "job": {"core", "run"},
    "tools": {"core", "run", "job"},
    "launch": {"core", "run", "job"},
    "command": {"core", "run", "job", "tools"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "launch":
        return "launch"
    if len(parts) == 1:
        return "package"  # bfly/__init__.py
    if parts[1] in MAY_IMPORT and parts[1] not in ("launch", "command"):
        return parts[1]
    return "command"


def our_modules() -> dict[str, Path]:
    files = [*REPO.glob("bfly/**/*.py"), *REPO.glob("launch/**/*.py")]
    return {module_name(f): f for f in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `path` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from bfly.core import config` imports bfly.core.config; `from bfly.core.config import X` the module
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in ("bfly", "launch"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    known = set(modules)
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    # A package's __init__ is reached on the way to its modules: not an edge of its own.
    return {m: imports_of(p, known) - packages - {m} for m, p in modules.items()}


def floor_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        mine = floor_of(src)
        if mine == "package":
            continue
        allowed = MAY_IMPORT[mine] | {mine}
        for dst in sorted(targets):
            theirs = floor_of(dst)
            if theirs == "command" or theirs not in allowed:
                bad.append(
                    f"{src} ({mine}) imports {dst} ({theirs}): {mine} may import {sorted(allowed - {'command'})}"
                )
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    return found


def test_every_module_sits_on_a_floor():
    floors = {floor_of(m) for m in our_modules()}
    assert floors <= {"package", *MAY_IMPORT}
    commands = sorted(m for m in our_modules() if floor_of(m) == "command")
    for m in commands:  # an entry point holds no code of its own
        code = [
            ln for ln in our_modules()[m].read_text().splitlines() if ln.strip() and not ln.startswith(("#", '"""'))
        ]
        assert len(code) <= 8, f"{m} is a command's entry point: its code belongs on a floor"


def test_imports_point_inward_only():
    assert floor_violations(graph()) == []


def test_there_is_no_import_circle():
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"bfly.core.config": {"bfly.run.runlog"}}, "bfly.core.config (core) imports bfly.run.runlog (run)"),
        ({"bfly.run.loop": {"bfly.job.exits"}}, "bfly.run.loop (run) imports bfly.job.exits (job)"),
        ({"bfly.job.retry": {"bfly.train"}}, "bfly.job.retry (job) imports bfly.train (command)"),
        ({"launch.submit": {"bfly.tools.report"}}, "launch.submit (launch) imports bfly.tools.report (tools)"),
    ],
)
def test_an_import_that_points_outward_is_named(edges, expected):
    (line,) = floor_violations(edges)
    assert line.startswith(expected)


def test_an_import_circle_is_named():
    edges = {"bfly.job.a": {"bfly.job.b"}, "bfly.job.b": {"bfly.job.c"}, "bfly.job.c": {"bfly.job.a"}}
    assert cycles(edges) == [["bfly.job.a", "bfly.job.b", "bfly.job.c", "bfly.job.a"]]
    assert cycles({"bfly.job.a": {"bfly.job.b"}, "bfly.job.b": set()}) == []
