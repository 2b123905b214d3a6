"""Suspect nodes of a run: `run.dir/suspect_nodes.json`, and which of them a requeued job avoids.

A node is blamed (an entry in the ledger: node, host, reason, what happened, step, job, time) for

* a hang that names it (the hang watchdog's line: the stalled rank's host),
* a crash whose error looks like the hardware's (CUDA, NCCL, ECC, Xid ...) on it and not on every node,
* a failed node check (bfly.nodecheck) on it while other nodes passed the same check,
* a straggler named on it (bfly.run.health: STRAGGLER_POINTS log points in a row) in a job that then
  failed: recorded, never excluding by itself (a slow node still computes right),

and not for a user error (config, data, run directory) or a preemption: those are no node's fault.

A job that requeues itself after a failure excludes the nodes blamed during this job from its next
placement (`scontrol update JobId=<id> ExcNodeList=...`), within a cap: the job's own `--exclude`
and BFLY_EXCLUDE_NODES (nodes excluded by hand) always stay; blamed nodes are added most recent
first while at least the job's node count of the partition's usable nodes (`sinfo`) stays available,
and at most BFLY_MAX_EXCLUDED_NODES (default 4) of them. A new submission starts with no exclusion (the
nodes may have been repaired since); the ledger keeps every entry for the record. The file is read
and rewritten under a lock, like retries.json: several nodes may blame at once.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bfly.run.rundir import locked_json

FILE = "suspect_nodes.json"
HANG, HARDWARE, NODE_CHECK, STRAGGLER = "hang", "hardware", "node check", "straggler"
EXCLUDING = (HANG, HARDWARE, NODE_CHECK)  # the reasons that exclude a node from the job's next placement


@dataclass(frozen=True)
class Blame:
    node: str  # as SLURM names it
    reason: str  # HANG, HARDWARE or NODE_CHECK
    what: str  # one line: "rank 1 hung there at step 4,210"
    job: str
    step: int | None = None  # the global step the run had reached
    host: str | None = None  # the host name the processes saw, where it differs from the node's
    time: str = ""

    @classmethod
    def now(cls, node: str, reason: str, what: str, job: str, step: int | None = None, host: str | None = None):
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(node, reason, what, job, step, host if host != node else None, stamp)


# --- the file ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[dict[str, Any]]:
    with locked_json(run_dir / FILE, indent=1) as state:
        state.setdefault("blamed", [])
        state.setdefault("hosts", {})
        yield state


def _state(run_dir: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / FILE).read_text())
    return {}


def read(run_dir: Path) -> list[Blame]:
    """Every entry of the run's ledger, oldest first (none: an empty list)."""
    fields = Blame.__dataclass_fields__
    return [Blame(**{k: v for k, v in e.items() if k in fields}) for e in _state(run_dir).get("blamed", [])]


def add(run_dir: Path, blames: Sequence[Blame]) -> list[Blame]:
    """Adds the blames not there yet (the same node, reason, line and job: one event read twice, by a
    torchrun restart and then the requeue); returns those added."""
    if not blames:
        return []
    added = []
    with _locked(run_dir) as state:
        known = {(b["node"], b["reason"], b["what"], b["job"]) for b in state["blamed"]}
        for b in blames:
            if (b.node, b.reason, b.what, b.job) not in known:
                known.add((b.node, b.reason, b.what, b.job))
                state["blamed"].append(asdict(b))
                added.append(b)
    return added


def record_hosts(run_dir: Path, job: str, hosts: dict[str, str]) -> None:
    """Which host name each node of `job` has (the node check finds out): a hang names hosts, SLURM nodes."""
    with _locked(run_dir) as state:
        state["hosts"][job] = hosts


def hosts_of(run_dir: Path, job: str) -> dict[str, str]:
    return dict(_state(run_dir).get("hosts", {}).get(job, {}))


def node_of(host: str, job_nodes: Sequence[str], hosts: dict[str, str]) -> str | None:
    """The node a host name is on: the job's only node; the node the check saw that host on (one only);
    or the host itself when it is one of the job's nodes. None: cannot tell."""
    if len(job_nodes) == 1:
        return job_nodes[0]
    on = {node for node, h in hosts.items() if h == host}
    if len(on) == 1:
        return on.pop()
    short = host.split(".")[0]
    return short if short in job_nodes else None


# --- the decision (pure) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    usable: tuple[str, ...]  # the usable nodes of the job's partition(s), from sinfo
    needed: int  # the job's node count
    most: int  # BFLY_MAX_EXCLUDED_NODES


@dataclass(frozen=True)
class Exclusion:
    nodes: tuple[str, ...]  # the job's exclusion list: the user's, by hand, then the blamed ones
    blamed: tuple[Blame, ...]  # the blamed nodes in it (the latest entry of each)
    refused: tuple[tuple[Blame, str], ...]  # blamed nodes left out, and why

    def lines(self, before: Sequence[str]) -> list[str]:
        """What to print: one line per node newly excluded and per node left in."""
        out = [f"excluding {b.node} from this job: {b.what}" for b in self.blamed if b.node not in before]
        out += [f"not excluding {b.node} ({b.what}): {why}" for b, why in self.refused]
        return out


def excluded(ledger: Sequence[Blame], cap: Cap, user_excludes: Sequence[str], manual: Sequence[str]) -> Exclusion:
    """The nodes a job's next placement must avoid: `user_excludes` (the job's own --exclude) and `manual`
    (BFLY_EXCLUDE_NODES) always; then each node blamed in `ledger` for a hang, a hardware-looking failure
    or a failed node check, most recent first, while `cap.needed` of `cap.usable` stay available and at
    most `cap.most` are excluded this way."""
    keep = list(dict.fromkeys([*user_excludes, *manual]))
    latest: dict[str, Blame] = {}
    for b in ledger:
        if b.reason in EXCLUDING and b.node not in keep:
            latest.pop(b.node, None)
            latest[b.node] = b  # re-inserted: the dict ends with the most recent
    chosen: list[Blame] = []
    refused: list[tuple[Blame, str]] = []
    for b in reversed(latest.values()):
        left = [n for n in cap.usable if n not in keep and n != b.node and all(n != c.node for c in chosen)]
        if len(chosen) >= cap.most:
            refused.append((b, f"{len(chosen)} node(s) excluded already (BFLY_MAX_EXCLUDED_NODES={cap.most})"))
        elif len(left) < cap.needed:
            refused.append(
                (b, f"it would leave {len(left)} usable node(s) in the partition, this job needs {cap.needed}")
            )
        else:
            chosen.append(b)
    return Exclusion(tuple(keep + [b.node for b in chosen]), tuple(chosen), tuple(refused))


# --- what SLURM says -------------------------------------------------------------------------------------

# Node states that can take the job's next placement (sinfo %t, short names); `*` (not responding) never.
USABLE = ("idle", "mix", "alloc", "comp", "plnd", "resv", "mixed", "allocated", "completing", "planned")


@dataclass(frozen=True)
class Job:
    nodes: tuple[str, ...]  # where it runs now
    needed: int
    partitions: tuple[str, ...]
    excluded: tuple[str, ...]  # ExcNodeList now (the user's --exclude, and earlier exclusions)


def _run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(out.stderr or out.stdout).strip()[:200]}")
    return out.stdout


def expand(hostlist: str) -> list[str]:
    """`n[1-2],gpu7` -> [n1, n2, gpu7] (scontrol show hostnames)."""
    if not hostlist or hostlist == "(null)":
        return []
    return _run("scontrol", "show", "hostnames", hostlist).split()


def job(job_id: str) -> Job:
    text = _run("scontrol", "show", "job", "-o", job_id)
    field = dict(re.findall(r"(\w+)=(\S*)", text))
    needed = re.match(r"\d+", field.get("NumNodes", "1"))
    return Job(
        tuple(expand(field.get("NodeList", ""))),
        int(needed.group()) if needed else 1,
        tuple(p for p in field.get("Partition", "").split(",") if p),
        tuple(expand(field.get("ExcNodeList", ""))),
    )


def usable_nodes(partitions: Sequence[str]) -> tuple[str, ...]:
    text = _run("sinfo", "-h", "-N", "-o", "%N %t", *(["-p", ",".join(partitions)] if partitions else []))
    nodes = []
    for line in text.splitlines():
        node, _, state = line.partition(" ")
        if "*" not in state and state.rstrip("~#!%$@^-") in USABLE:
            nodes.append(node)
    return tuple(dict.fromkeys(nodes))


def address(node: str) -> str:
    """The address SLURM reaches `node` at (NodeAddr; node names need not resolve as host names)."""
    match = re.search(r"\bNodeAddr=(\S+)", _run("scontrol", "show", "node", node, "-o"))
    return match.group(1) if match and match.group(1) != "(null)" else node


# --- blame from what the job recorded (pure) -----------------------------------------------------------------

# A stalled rank with its host: at its last step, or found stopped or dead before its first heartbeat.
_STALLED = re.compile(
    r"rank (\d+) \(([^,()]+), pid \d+\)[^;]*?(?:last step (\d+)|sent no heartbeat and is (?:stopped|dead))"
)
# Errors that point at a node's GPU, driver or interconnect rather than at the program.
HARDWARE_ERROR = re.compile(
    r"CUDA error|CUDA driver|cudaError|CUBLAS_STATUS_EXECUTION_FAILED|cuDNN error|NCCL|ECC|Xid|uncorrectable|"
    r"GPU is lost|fallen off the bus|illegal memory access|unspecified launch failure|NVLink|no CUDA-capable device",
    re.IGNORECASE,
)


def from_hang(line: str, job: str, job_nodes: Sequence[str], hosts: dict[str, str]) -> list[Blame]:
    """The nodes of the ranks a hang line names as stalled (`stalled: rank 1 (host, pid 7) ..., last step 4`)."""
    named = line.split("stalled: ", 1)[1] if "stalled: " in line else ""
    blames = []
    for rank, host, step in _STALLED.findall(named):
        node = node_of(host, job_nodes, hosts)
        where = f"at step {int(step):,}" if step else "before its first heartbeat"
        if node is not None:
            blames.append(
                Blame.now(node, HANG, f"rank {rank} hung there {where}", job, int(step) if step else None, host)
            )
    return blames


def from_crash(records: Sequence[dict[str, Any]], job: str, job_nodes: Sequence[str], step: int | None) -> list[Blame]:
    """The nodes whose trainers' errors look like the hardware's, unless every node of a multi-node job
    has them (then the cause is shared: the network, the software)."""
    hit: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("node") and HARDWARE_ERROR.search(r.get("error") or ""):
            hit.setdefault(r["node"], r)
    if len(job_nodes) > 1 and set(job_nodes) <= set(hit):
        return []
    return [
        Blame.now(node, HARDWARE, f"rank {r['rank']} failed there: {r['error'][:160]}", job, step, r.get("host"))
        for node, r in hit.items()
    ]


_STRAGGLER = re.compile(r"rank (\d+) \(([^()]+)\) is a straggler: ([\d.]+)x")


def from_stragglers(log_lines: Sequence[str], job: str, job_nodes: Sequence[str], hosts: dict[str, str]) -> list[Blame]:
    """The nodes of the ranks named stragglers in this attempt's train.log lines (bfly.run.health's warning)."""
    blames: dict[str, Blame] = {}
    for line in log_lines:
        found = _STRAGGLER.search(line)
        node = node_of(found[2], job_nodes, hosts) if found else None
        if found and node is not None:
            what = f"rank {found[1]} was a straggler there ({found[3]}x the other ranks' own work per step)"
            blames[node] = Blame.now(node, STRAGGLER, what, job, None, found[2])
    return list(blames.values())
