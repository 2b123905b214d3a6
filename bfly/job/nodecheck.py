"""Every node of a job checked before training: `python -m bfly.nodecheck`, one task per node.

    srun --ntasks-per-node=1 python -m bfly.nodecheck --config X [key=value ...] [--rdzv HOST:PORT]

Our sbatch scripts run it as their first step, on every attempt (a requeued job lands on new nodes);
`run.node_check=false` skips it. It checks on each node, in parallel, within a minute for up to 8 nodes:

* the data root is readable and its metadata (the CSV files, the folder listing and file counts; no image
  is decoded) is the same as on the other nodes;
* the run directory is the same shared directory on every node (a token written on one node is read on
  the others) and has the free space the checkpoints need;
* Python, torch, CUDA, NCCL and bfly's commit are the same on every node;
* the clocks agree within CLOCK_SKEW_S;
* the rendezvous host and port are reachable from every node (the check meets there, in a TCPStore);
* on GPUs: the visible GPU count is what the job asked for, each GPU runs a small kernel and has most of
  its memory free, and NVML reports no uncorrectable ECC error or pending page retirement (pynvml; skipped
  with one line without it);
* the network: a short all-reduce over all nodes (NCCL on GPUs, gloo on CPU); with 3 nodes or more, each
  pair of ring neighbours is measured too, and a node whose every pair is below SLOW_RATIO of the best
  pair is named.

One line per failing node (`n2: data root /data/x not readable (No such file or directory)`); a node that
failed while another passed (or failed on its own hardware) goes into the run's suspect-node ledger
(bfly/job/ledger.py), which a requeue avoids. Healthy nodes give one summary line.

Exit statuses, beside bfly.train's 0 (done), 1 (crash), 2 (user error), 75 (stopped, checkpoint written)
and 76 (hang): 0 every node passed; 2 the config is invalid; 77 a node failed the check
(EXIT_NODE_CHECK, bfly/job/exits.py): the job ends before training, or requeues away from that node.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bfly.core import env as environ
from bfly.core.errors import one_line
from bfly.job import faults, ledger
from bfly.job.exits import EXIT_NODE_CHECK, EXIT_USER_ERROR

JOIN_TIMEOUT_S = 30.0  # a node that has not joined by then is named
DEADLINE_S = 75.0  # the whole check, whatever hangs: then it ends with EXIT_NODE_CHECK
CLOCK_SKEW_S = 2.0
SLOW_RATIO = 0.5
MIN_FREE_GPU_MEMORY = 0.8  # of each GPU's memory: less free means another process holds it
ALLREDUCE_BYTES = {"cpu": 4 * 2**20, "cuda": 64 * 2**20}
TOKENS = ".bfly-nodecheck"


@dataclass(frozen=True)
class Problem:
    node: str
    text: str
    hardware: bool = False  # the node's own (GPU, clock, network, absent): blamed even if every node has it


# --- what one node finds -------------------------------------------------------------------------------


def data_digest(root: Path) -> tuple[str, int]:
    """(digest, class folders) of a data root's metadata: the top-level entries (names, file sizes), the
    CSV files' bytes, and each split folder's class folders with their file counts. Hidden entries (the
    decode cache) are left out."""
    h = hashlib.sha256()
    classes = 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            h.update(f"{entry.name}:{entry.stat().st_size}\n".encode())
            if entry.name.endswith(".csv"):
                h.update(hashlib.sha256(Path(entry.path).read_bytes()).digest())
        elif entry.is_dir():
            subs = sorted(os.scandir(entry.path), key=lambda e: e.name)
            h.update(f"{entry.name}/:{sum(1 for s in subs if s.is_file())}\n".encode())
            for sub in (s for s in subs if s.is_dir() and not s.name.startswith(".")):
                h.update(f"{entry.name}/{sub.name}/:{len(os.listdir(sub.path))}\n".encode())
                classes += entry.name == "train"
    return h.hexdigest()[:16], classes


def data_facts(root: Path) -> dict[str, Any]:
    try:
        digest, classes = data_digest(root)
    except OSError as e:
        return {"root": str(root), "error": e.strerror or str(e)}
    return {"root": str(root), "error": None, "digest": digest, "classes": classes}


def run_dir_facts(run_dir: Path, name: str, token: str, need: int) -> dict[str, Any]:
    """Writes this node's token into the run directory; its free space against what the checkpoints need."""
    try:
        where = run_dir / TOKENS
        where.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(token)
        free = shutil.disk_usage(run_dir).free
    except OSError as e:
        return {"dir": str(run_dir), "error": e.strerror or str(e)}
    return {"dir": str(run_dir), "error": None, "free": free, "need": need}


def tokens_seen(run_dir: Path, tokens: dict[str, str]) -> list[str]:
    """The nodes whose token this node reads in its view of the run directory."""
    seen = []
    for name, token in tokens.items():
        with contextlib.suppress(OSError):
            if (run_dir / TOKENS / name).read_text() == token:
                seen.append(name)
    return seen


def version_facts(device: Any, fake: dict[str, str]) -> dict[str, str | None]:
    from bfly.job.attempts import code_version, library_versions

    lib = library_versions(device)
    code = code_version()
    bfly = code["commit"] or code["version"]
    if code["commit"] and code["dirty"]:
        bfly += " (modified)"
    found = {"python": lib["python"], "torch": lib["torch"], "cuda": lib["cuda"], "nccl": lib["nccl"], "bfly": bfly}
    return found | fake


def gpu_facts(expected: int | None) -> dict[str, Any]:
    """Each visible GPU: a small kernel's result, free and total memory."""
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        fact: dict[str, Any] = {"index": i, "error": None}
        try:
            a = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096
            got = (a.to(f"cuda:{i}") @ a.to(f"cuda:{i}")).cpu()
            torch.cuda.synchronize(i)
            fact["kernel_error"] = float(((got - a @ a).norm() / (a @ a).norm()).item())
            fact["free"], fact["total"] = torch.cuda.mem_get_info(i)
        except Exception as e:  # a broken GPU raises anything: each is one line
            fact["error"] = one_line(e)
        gpus.append(fact)
    return {"expected": expected, "gpus": gpus, "nvml": nvml_facts(len(gpus))}


def nvml_facts(count: int) -> dict[str, Any]:
    """NVML's health of each visible GPU: uncorrectable ECC errors, retired pages pending, row remapping failed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return {"skipped": "NVML health skipped: pynvml not installed"}
    import torch

    try:
        pynvml.nvmlInit()
    except Exception as e:
        return {"skipped": f"NVML health skipped: {one_line(e)}"}
    bad: list[str] = []
    for i in range(count):
        with contextlib.suppress(Exception):  # a query this GPU does not support tells nothing
            uuid = str(torch.cuda.get_device_properties(i).uuid)
            h = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            ecc = pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, 0)
            if ecc:
                bad.append(f"GPU {i}: {ecc} uncorrectable ECC error(s) since the driver loaded")
            if pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h):
                bad.append(f"GPU {i}: retired memory pages pending (the GPU needs a reset)")
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()
    return {"skipped": None, "problems": bad}


# --- verdicts on what the nodes found (pure) ---------------------------------------------------------------


def reference(values: dict[str, Any], head: str) -> Any:
    """The value most nodes have; a tie goes to the head node's."""
    counts = Counter(values.values())
    best = max(counts.values())
    return values[head] if counts[values[head]] == best else next(v for v, c in counts.items() if c == best)


def data_problems(facts: dict[str, dict[str, Any]], head: str) -> list[Problem]:
    out = [Problem(n, f"data root {f['root']} not readable ({f['error']})") for n, f in facts.items() if f["error"]]
    readable = {n: f["digest"] for n, f in facts.items() if not f["error"]}
    if len(set(readable.values())) > 1:
        ref = reference(readable, head if head in readable else next(iter(readable)))
        like = next(n for n, d in readable.items() if d == ref)
        out += [
            Problem(n, f"data root {facts[n]['root']} differs from {like}'s (metadata digest {d}, {like}: {ref})")
            for n, d in readable.items()
            if d != ref
        ]
    return out


def run_dir_problems(facts: dict[str, dict[str, Any]], seen: dict[str, list[str]], head: str) -> list[Problem]:
    out = []
    for n, f in facts.items():
        if f["error"]:
            out.append(Problem(n, f"run directory {f['dir']} not writable ({f['error']})"))
        elif n != head and head not in seen.get(n, []):
            out.append(
                Problem(n, f"run directory {f['dir']} is not the one {head} sees (its token is not there): not shared")
            )
        elif f["free"] < f["need"]:
            out.append(
                Problem(
                    n,
                    f"run directory {f['dir']}: {f['free'] / 2**20:.0f} MiB free, "
                    f"checkpoints need about {f['need'] / 2**20:.0f} MiB",
                )
            )
    return out


def version_problems(facts: dict[str, dict[str, str | None]], head: str) -> list[Problem]:
    out = []
    for key in ("python", "torch", "cuda", "nccl", "bfly"):
        values = {n: f.get(key) for n, f in facts.items()}
        ref = reference(values, head)
        like = next(n for n, v in values.items() if v == ref)
        out += [Problem(n, f"{key} {v} differs from {like}'s {ref}") for n, v in values.items() if v != ref]
    return out


def clock_problems(skews: dict[str, float], head: str, bound: float = CLOCK_SKEW_S) -> list[Problem]:
    return [
        Problem(n, f"clock {s:+.1f} s from {head}'s (more than {bound:g} s)", hardware=True)
        for n, s in skews.items()
        if abs(s) > bound
    ]


def gpu_problems(node: str, facts: dict[str, Any] | None) -> list[Problem]:
    if not facts:
        return []
    out, gpus = [], facts["gpus"]
    if facts["expected"] is not None and len(gpus) != facts["expected"]:
        out.append(f"{len(gpus)} GPU(s) visible, the job asked for {facts['expected']}")
    for g in gpus:
        if g["error"]:
            out.append(f"GPU {g['index']} does not answer a small kernel ({g['error']})")
        elif g["kernel_error"] > 1e-2:
            out.append(f"GPU {g['index']} computes a wrong matrix product (relative error {g['kernel_error']:.2g})")
        elif g["free"] < MIN_FREE_GPU_MEMORY * g["total"]:
            out.append(
                f"GPU {g['index']}: {g['free'] / 2**30:.1f} of {g['total'] / 2**30:.1f} GiB free (another process?)"
            )
    out += facts["nvml"].get("problems", [])
    return [Problem(node, text, hardware=True) for text in out]


def slow_nodes(pairs: dict[tuple[str, str], float], ratio: float = SLOW_RATIO) -> dict[str, float]:
    """Nodes whose every measured pair is below `ratio` x the best pair's bandwidth: {node: its best pair's}."""
    if len(pairs) < 2:
        return {}
    bound = ratio * max(pairs.values())
    mine: dict[str, list[float]] = {}
    for (a, b), bw in pairs.items():
        mine.setdefault(a, []).append(bw)
        mine.setdefault(b, []).append(bw)
    return {n: max(bws) for n, bws in mine.items() if max(bws) < bound}


def ring_rounds(n: int) -> list[list[tuple[int, int]]]:
    """The ring's neighbour pairs (i, i+1 mod n), in rounds where no rank is in two pairs; every rank is
    in two pairs. Fewer than 3 ranks: none (nothing to compare a pair with)."""
    if n < 3:
        return []
    edges = [(i, (i + 1) % n) for i in range(n)]
    rounds: list[list[tuple[int, int]]] = []
    for e in edges:
        for r in rounds:
            if not {x for p in r for x in p} & set(e):
                r.append(e)
                break
        else:
            rounds.append([e])
    return rounds


def verdict(problems: Sequence[Problem], nodes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(one line per failing node, the nodes to blame). A node is blamed for its own hardware, or for what
    it alone got wrong: when every node fails the same way, the setup is wrong, not a node."""
    by_node: dict[str, list[Problem]] = {}
    for p in problems:
        by_node.setdefault(p.node, []).append(p)
    named = [*nodes, *(n for n in by_node if n not in nodes)]  # a problem of no one node ("network") last
    lines = [f"{n}: " + "; ".join(p.text for p in by_node[n]) for n in named if n in by_node]
    passed = any(n not in by_node for n in nodes)
    blamed = [n for n in nodes if n in by_node and (passed or any(p.hardware for p in by_node[n]))]
    return lines, blamed


# --- the nodes meet: a TCPStore at the rendezvous address ----------------------------------------------------


def _json(store: Any, key: str) -> Any:
    return json.loads(bytes(store.get(key)).decode())


def _wait_keys(store: Any, keys: Sequence[str], seconds: float) -> list[str]:
    """Waits until every key is set or `seconds` pass; returns the keys still missing."""
    deadline = time.monotonic() + seconds
    missing = list(keys)
    while missing and time.monotonic() < deadline:
        missing = [k for k in missing if not store.check([k])]
        if missing:
            time.sleep(0.05)
    return missing


def meet(rdzv: tuple[str, int], rank: int, timeout_s: float) -> Any:
    """The check's store: served by rank 0 on the rendezvous port, reached by the others within `timeout_s`;
    its operations wait up to `timeout_s`."""
    from torch.distributed import TCPStore

    host, port = rdzv
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        return TCPStore(host, port, None, True, timeout=timeout, wait_for_workers=False)
    # Until the store listens, plain connection attempts: torch's client may wait twice the time it is given,
    # more on a loaded node, and a node that comes late must still say so itself before the hard deadline.
    _wait_listening(host, port, timeout_s)
    return TCPStore(host, port, None, False, timeout=timeout, wait_for_workers=False)


def _wait_listening(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no answer within {seconds:.0f} s: {one_line(e)}") from e
            time.sleep(0.2)


def measure_network(store: Any, rank: int, world: int, device: Any, slow_s: float) -> None:
    """All-reduce over every node, then over each ring pair (3 nodes or more); the seconds of one
    all-reduce go into the store (`net/all`, `net/<a>-<b>`)."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("nodecheck/pg", store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=20),
    )
    try:
        x = torch.ones(ALLREDUCE_BYTES[device.type] // 4, device=device)
        took = _time_allreduce(x, None, slow_s, device)
        if rank == 0:
            store.set("net/all", str(took))
        for pairs in ring_rounds(world):
            groups = [dist.new_group(list(p)) for p in pairs]  # every rank creates every group
            for p, group in zip(pairs, groups):
                if rank in p:
                    took = _time_allreduce(x, group, slow_s, device)
                    if rank == p[0]:
                        store.set(f"net/{p[0]}-{p[1]}", str(took))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _time_allreduce(x: Any, group: Any, slow_s: float, device: Any, repeat: int = 3) -> float:
    import torch
    import torch.distributed as dist

    dist.all_reduce(x, group=group)  # warm-up: connections, NCCL communicators
    start = time.perf_counter()
    for _ in range(repeat):
        time.sleep(slow_s)
        dist.all_reduce(x, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def bandwidths(store: Any, names: Sequence[str], nbytes: int) -> tuple[float, dict[tuple[str, str], float]]:
    """(bus bandwidth of the all-node all-reduce in bytes/s, each ring pair's)."""
    world = len(names)
    full = 2 * (world - 1) / world * nbytes / float(bytes(store.get("net/all")))
    pairs = {}
    for round_ in ring_rounds(world):
        for a, b in round_:
            pairs[(names[a], names[b])] = nbytes / float(bytes(store.get(f"net/{a}-{b}")))
    return full, pairs


# --- one node's part, and rank 0's verdict ------------------------------------------------------------------


@dataclass
class Setup:
    cfg: Any
    node: str
    rank: int
    world: int
    local: int  # this task's index on its node (SLURM_LOCALID): its GPU; the first checks the node's GPUs
    rdzv: tuple[str, int] | None
    fault: faults.NodeFaults
    device: Any
    job: str


def my_facts(s: Setup, token: str) -> dict[str, Any]:
    from bfly.core.config import run_dir_of
    from bfly.job.preflight import checkpoint_estimate
    from bfly.run.resume import space_needed

    data = data_facts(Path(s.fault.data or s.cfg.data.root))
    run_dir = Path(s.fault.rundir) if s.fault.rundir else run_dir_of(s.cfg)
    need = space_needed(run_dir, s.cfg, *checkpoint_estimate(s.cfg, data.get("classes") or 1000))
    gpus = gpu_facts(environ.slurm_gpus_on_node()) if s.device.type == "cuda" and s.local == 0 else None
    return {
        "node": s.node,
        "host": socket.gethostname(),
        "data": data,
        "run_dir": run_dir_facts(run_dir, f"{s.job}.{s.rank}", token, need),
        "versions": version_facts(s.device, s.fault.versions),
        "gpus": gpus,
    }


def problems_of(facts: dict[str, dict[str, Any]], seen: dict[str, dict[str, Any]], head: str) -> list[Problem]:
    """Every check's problems, from what each node found (`facts`) and saw after the meeting (`seen`)."""
    out = data_problems({n: f["data"] for n, f in facts.items()}, head)
    tokens = {n: s["seen"] for n, s in seen.items()}
    out += run_dir_problems({n: f["run_dir"] for n, f in facts.items()}, tokens, head)
    out += version_problems({n: f["versions"] for n, f in facts.items()}, head)
    out += clock_problems({n: s["skew"] for n, s in seen.items()}, head)
    for n, f in facts.items():
        out += gpu_problems(n, f["gpus"])
    return out


def summary(facts: dict[str, dict[str, Any]], seen: dict[str, dict[str, Any]], net: str, took: float) -> str:
    head = next(iter(facts.values()))
    versions = head["versions"]
    free = min(f["run_dir"]["free"] for f in facts.values())
    skew = max((abs(s["skew"]) for s in seen.values()), default=0.0)
    gpus = f"; {len(head['gpus']['gpus'])} GPU(s) per node answer" if head["gpus"] else ""
    bfly = versions["bfly"] or "?"
    bfly = bfly[:10] + (" (modified)" if bfly.endswith("(modified)") else "")
    many = len(facts) > 1
    return (
        f"nodes ok: {len(facts)}/{len(facts)} in {took:.0f} s; {net}; data root {head['data']['root']} "
        + ("the same on every node " if many else "")
        + f"(metadata {head['data']['digest']}); run directory {head['run_dir']['dir']} "
        + ("shared, " if many else "")
        + f"{free / 2**30:.1f} GiB free; python {versions['python']}, torch {versions['torch']}, bfly {bfly}"
        + (f" everywhere; clocks within {skew:.2f} s" if many else "")
        + gpus
    )


def check(s: Setup, started: float) -> int:
    """This node's part of the check; rank 0 also judges and reports. Returns the exit status."""
    token = secrets.token_hex(8)
    mine = my_facts(s, token) | {"token": token, "rank": s.rank}
    if s.world == 1:
        seen = {s.node: {"skew": 0.0, "seen": [s.node]}}
        return judge(s, {s.node: mine}, seen, [], "all-reduce skipped (one node)", started)
    time.sleep(s.fault.absent_s)
    host, port = s.rdzv or ("?", 0)
    try:
        # A node that cannot reach the store says so itself before the hard deadline.
        left = DEADLINE_S - (time.monotonic() - started) - 10
        store = meet((host, port), s.rank, max(1.0, min(JOIN_TIMEOUT_S, left)))
    except Exception as e:  # torch raises RuntimeError, DistNetworkError, TimeoutError ... : one line each
        print(f"bfly.nodecheck: {s.node}: cannot reach the rendezvous {host}:{port} ({one_line(e)})", file=sys.stderr)
        return EXIT_NODE_CHECK
    store.set(f"facts/{s.rank}", json.dumps(mine))
    if s.rank == 0:
        return lead(store, s, mine, started)
    go = _after(store, "go")
    store.set(f"seen/{s.rank}", json.dumps(_seen(s, mine, go)))
    if go["network"]:
        with contextlib.suppress(Exception):  # a failed all-reduce: rank 0 names it
            measure_network(store, s.rank, s.world, s.device, s.fault.slow_s)
    status = int(_after(store, "verdict")["status"])
    # Rank 0 removes the tokens it sees; a node with its own view of the run directory removes its own.
    with contextlib.suppress(OSError):
        (Path(mine["run_dir"]["dir"]) / TOKENS / f"{s.job}.{s.rank}").unlink(missing_ok=True)
    store.set(f"bye/{s.rank}", "1")
    return status


def _after(store: Any, key: str) -> Any:
    store.wait([key], timedelta(seconds=DEADLINE_S))
    return _json(store, key)


def _seen(s: Setup, mine: dict[str, Any], go: dict[str, Any]) -> dict[str, Any]:
    """What this node sees once every node has written its token: the clock against rank 0's, the tokens."""
    skew = time.time() + s.fault.clock_s - go["time"]
    tokens = {f"{s.job}.{rank}": t for rank, (_, t) in go["tokens"].items()}
    found = tokens_seen(Path(mine["run_dir"]["dir"]), tokens)
    return {"skew": skew, "seen": sorted({go["tokens"][name.removeprefix(f"{s.job}.")][0] for name in found})}


def lead(store: Any, s: Setup, mine: dict[str, Any], started: float) -> int:
    missing = set(_wait_keys(store, [f"facts/{r}" for r in range(s.world)], JOIN_TIMEOUT_S))
    every = [_json(store, f"facts/{r}") for r in range(s.world) if f"facts/{r}" not in missing]
    facts: dict[str, dict[str, Any]] = {}
    for f in every:  # several tasks on a node (launch.submit's): the node's first task speaks for it
        facts.setdefault(f["node"], f)
    absent = [_node_name(int(k.split("/")[1])) for k in sorted(missing)]
    tokens = {str(f["rank"]): (f["node"], f["token"]) for f in every}
    go = {"time": time.time(), "tokens": tokens, "network": not absent}
    store.set("go", json.dumps(go))
    seen = {s.node: _seen(s, mine, go)}
    others = [f"seen/{f['rank']}" for f in facts.values() if f["rank"] != 0]
    _wait_keys(store, others, JOIN_TIMEOUT_S)
    seen |= {
        n: _json(store, f"seen/{f['rank']}")
        for n, f in facts.items()
        if f["rank"] and store.check([f"seen/{f['rank']}"])
    }
    host, port = s.rdzv or ("?", 0)
    why = f"did not join the check within {JOIN_TIMEOUT_S:.0f} s (not started, or cannot reach {host}:{port})"
    extra = [Problem(n, why, hardware=True) for n in absent]
    for n in [n for n in facts if n not in seen]:  # joined, then went quiet: named for that alone
        extra.append(Problem(n, f"joined the check, then did not answer for {JOIN_TIMEOUT_S:.0f} s", hardware=True))
        seen[n] = {"skew": 0.0, "seen": [s.node]}
    net = "all-reduce skipped (a node is missing)"
    if not absent:
        net, slow = _network(store, s, [f["node"] for f in every])
        extra += slow
    status = judge(s, facts, seen, extra, net, started, absent)
    store.set("verdict", json.dumps({"status": status}))
    _wait_keys(store, [f"bye/{f['rank']}" for f in every if f["rank"] != 0], 10)
    return status


def _network(store: Any, s: Setup, names: list[str]) -> tuple[str, list[Problem]]:
    nbytes = ALLREDUCE_BYTES[s.device.type]
    try:
        measure_network(store, s.rank, s.world, s.device, s.fault.slow_s)
        full, pairs = bandwidths(store, names, nbytes)
    except Exception as e:  # a node dropped out, a NCCL error: the nodes' network is the problem
        return "all-reduce failed", [Problem("network", f"all-reduce over the nodes failed ({one_line(e)[:200]})")]
    backend = "nccl" if s.device.type == "cuda" else "gloo"
    nodes = len(set(names))
    line = f"all-reduce {nodes}x{s.world // nodes} ranks ({backend}, {nbytes // 2**20} MiB): {full / 1e9:.2f} GB/s"
    if pairs:
        line += f", ring pairs {min(pairs.values()) / 1e9:.2f}-{max(pairs.values()) / 1e9:.2f} GB/s"
    best = max(pairs.values(), default=0.0)
    slow = [
        Problem(
            n,
            f"all-reduce bandwidth {bw / 1e9:.2f} GB/s with its neighbours, below {SLOW_RATIO:g} x the best "
            f"pair's {best / 1e9:.2f} GB/s",
            hardware=True,
        )
        for n, bw in slow_nodes(pairs).items()
    ]
    return line, slow


def _node_name(rank: int) -> str:
    """The node of a task that never said (one task per node: task i runs on the step's i-th node)."""
    with contextlib.suppress(Exception):
        return ledger.expand(environ.slurm_nodelist() or "")[rank]
    return f"task {rank}"


def judge(
    s: Setup,
    facts: dict[str, dict[str, Any]],
    seen: dict[str, dict[str, Any]],
    extra: list[Problem],
    net: str,
    started: float,
    absent: Sequence[str] = (),
) -> int:
    """Rank 0: one line per failing node, or the summary; the blamed nodes into the ledger. The status."""
    from bfly.core.config import run_dir_of

    head = s.node
    problems = problems_of(facts, seen, head) + extra
    nodes = [*facts, *absent]
    lines, blamed = verdict(problems, nodes)
    blamed = [n for n in blamed if not n.startswith("task ")]  # no node list to name it by: nothing to exclude
    skipped = {f["gpus"]["nvml"]["skipped"] for f in facts.values() if f["gpus"] and f["gpus"]["nvml"]["skipped"]}
    for line in sorted(skipped):
        print(f"bfly.nodecheck: {line}", flush=True)
    run_dir = run_dir_of(s.cfg)
    shutil.rmtree(run_dir / TOKENS, ignore_errors=True)
    if len(nodes) > 1:  # a hang names hosts; the ledger blames nodes
        with contextlib.suppress(OSError):
            ledger.record_hosts(run_dir, s.job, {n: f["host"] for n, f in facts.items()})
    took = time.monotonic() - started
    if not lines:
        print(f"bfly.nodecheck: {summary(facts, seen, net, took)}", flush=True)
        return 0
    for line in lines:
        print(f"bfly.nodecheck: {line}", file=sys.stderr, flush=True)
    failing = sum(1 for n in nodes if any(p.node == n for p in problems))
    end = f"bfly.nodecheck: {failing} of {len(nodes)} node(s) failed the check in {took:.0f} s: not training (exit {EXIT_NODE_CHECK})"
    if blamed:
        text = {p.node: p.text for p in problems}
        step = _last_step(run_dir)
        ledger.add(
            run_dir,
            [
                ledger.Blame.now(
                    n,
                    ledger.NODE_CHECK,
                    f"it failed the node check: {text[n]}",
                    s.job,
                    step,
                    facts.get(n, {}).get("host"),
                )
                for n in blamed
            ],
        )
        end += f"; {', '.join(blamed)} recorded in {run_dir / ledger.FILE}"
    print(end, file=sys.stderr, flush=True)
    _record_exit("; ".join(lines))
    return EXIT_NODE_CHECK


def _last_step(run_dir: Path) -> int | None:
    from bfly.job import attempts

    with contextlib.suppress(Exception):
        ends = [a["end"]["global_step"] for a in attempts.read(run_dir) if a.get("end")]
        return ends[-1] if ends else None
    return None


def _record_exit(detail: str) -> None:
    """For the launcher's retry decision (bfly.retry after): the check failed, and why."""
    where = environ.exit_status_dir()
    if where is None:
        return
    with contextlib.suppress(OSError):
        where.mkdir(parents=True, exist_ok=True)
        (where / "nodecheck.json").write_text(json.dumps({"status": EXIT_NODE_CHECK, "detail": detail}))


# --- the command ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bfly.nodecheck",
        description=__doc__.split("\n")[0],
        epilog="Run it as SLURM tasks, one per node: srun --ntasks-per-node=1 python -m bfly.nodecheck --config X",
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument(
        "--rdzv",
        metavar="HOST:PORT",
        help="where the nodes meet: the job's rendezvous address (default: the first node's address, "
        "port 20000 + job id %% 20000, as slurm/train_multi_node.sbatch)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)


def default_rdzv() -> tuple[str, int]:
    first = ledger.expand(environ.slurm_nodelist() or "")[0]
    job = int((environ.slurm_job_id() or "0").split("_")[0])
    return ledger.address(first), 20000 + job % 20000


def _hard_deadline(node: str) -> threading.Timer:
    """Whatever blocks (a store, a collective, a filesystem), the check ends by DEADLINE_S."""

    def end() -> None:
        print(
            f"bfly.nodecheck: {node}: the check did not finish within {DEADLINE_S:.0f} s", file=sys.stderr, flush=True
        )
        os._exit(EXIT_NODE_CHECK)

    timer = threading.Timer(DEADLINE_S, end)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    """The command; launch.submit's tasks call it in-process before training (one task per GPU: the tasks
    of a node share its facts, each all-reduces on its own GPU)."""
    started = time.monotonic()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from bfly.core.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"bfly.nodecheck: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if not cfg.run.node_check:
        print("bfly.nodecheck: skipped (run.node_check=false)", flush=True)
        return 0
    import torch

    rank, world, local = environ.slurm_task() or (0, 1, 0)
    node = environ.slurm_node_name() or socket.gethostname()
    rdzv = None
    if world > 1:
        host, _, port = (args.rdzv or "").rpartition(":")
        rdzv = (host, int(port)) if args.rdzv else default_rdzv()
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    job = environ.slurm_job_id() or "local"
    setup = Setup(cfg, node, rank, world, local, rdzv, faults.node_faults(node), device, job)
    # The sbatch scripts pass the time limit's SIGUSR1 to every job step: the check ends on its own.
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    timer = _hard_deadline(node)
    try:
        return check(setup, started)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, usr1)
