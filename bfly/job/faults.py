"""Faults injected by tests: what a node that differs from the others looks like to bfly.nodecheck.

BFLY_TEST_NODE_FAULT=<node>:<fault>=<value>[;...] (read in bfly.core.env), on <node> only:

    data=<path>          the data root is read at <path> (a stale or partial copy of the data)
    rundir=<path>        the run directory is <path> (a local disk, not the shared one)
    version=<key>@<v>    the version <key> (python, torch, cuda, nccl, bfly) reads <v>
    clock=<seconds>      the clock reads <seconds> ahead
    slow=<seconds>       each all-reduce of the check waits <seconds> first (a slow link)
    absent=<seconds>     the node waits <seconds> before it joins the check (a node that never comes)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bfly.core import env as environ

KINDS = ("data", "rundir", "version", "clock", "slow", "absent")


@dataclass(frozen=True)
class NodeFaults:
    data: str | None = None
    rundir: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    clock_s: float = 0.0
    slow_s: float = 0.0
    absent_s: float = 0.0


def parse(text: str, node: str) -> NodeFaults:
    """The faults of `node` in a BFLY_TEST_NODE_FAULT value; an item that does not parse is an error naming it."""
    found: dict[str, object] = {"versions": {}}
    for item in filter(None, (i.strip() for i in text.split(";"))):
        where, _, rest = item.partition(":")
        kind, sep, value = rest.partition("=")
        if not sep or kind not in KINDS:
            raise RuntimeError(f"BFLY_TEST_NODE_FAULT item {item!r}: expected <node>:<fault>=<value>, fault in {KINDS}")
        if where != node:
            continue
        if kind == "version":
            key, _, version = value.partition("@")
            found["versions"][key] = version  # type: ignore[index]
        elif kind in ("data", "rundir"):
            found[kind] = value
        else:
            found[f"{kind}_s"] = float(value)
    return NodeFaults(**found)  # type: ignore[arg-type]


def node_faults(node: str) -> NodeFaults:
    return parse(environ.node_faults_for_test(), node)
