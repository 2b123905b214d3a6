"""Process group set-up and the few collectives the trainer needs.

The model never sees any of this: DDP wrapping happens in bfly.stack (the device is picked there too).
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from bfly.core.env import DistEnv, agent_serves_store

# The key a rank sets in the process group's store before it leaves with an error: the other ranks, whose
# next collective fails, read which rank failed instead of printing a transport error. _DONE counts the
# ranks that announced or read it.
_FAILED = "bfly/failed_rank"
_DONE = "bfly/failure_known"


def init(env: DistEnv, device: torch.device, backend: str, timeout_s: int) -> None:
    if not env.distributed:
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("dist.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    # device_id binds NCCL's communicator to this rank's GPU at once (eager init); gloo takes none.
    dist.init_process_group(
        backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place; gloo cannot reduce on CUDA tensors it does not own, so callers pass the device tensor."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank passed True (a host sync: call it every N steps, not each)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Announcement:
    """A failure this rank announced in the store it serves (rank 0, unless torchrun's agent serves the
    store): the store must outlive the process group until the other ranks have read it."""

    def __init__(self, store: dist.Store, world_size: int):
        self.store, self.world_size = store, world_size

    def wait_read(self, timeout_s: float = 10.0) -> None:
        """After shutdown(): until every rank has read (or announced) a failure, at most timeout_s."""
        deadline = time.monotonic() + timeout_s
        try:
            while self.store.add(_DONE, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
        except dist.DistError:
            pass


def announce_failure(env: DistEnv) -> Announcement | None:
    """Before this rank leaves with an error (and closes its connections): say so in the store. The first
    rank to announce is the one the others name. Returns what rank 0 waits on after shutdown()."""
    if not active():
        return None
    store = _store()
    try:
        store.compare_set(_FAILED, "", str(env.rank))  # a round trip: the key is there when it returns
        store.add(_DONE, 1)
    except dist.DistError:
        return None  # the store is gone too: the other ranks say less
    return Announcement(store, env.world_size) if env.rank == 0 and not agent_serves_store() else None


def failed_rank(rank: int) -> int | None:
    """After a collective failed on `rank`: the rank that announced a failure, or None (none did: a
    rank killed by a signal, a hang, a network fault)."""
    if not active():
        return None
    store = _store()
    # Unless torchrun's agent serves it, the store lives in rank 0's process. A store client whose server
    # is gone prints a C++ stack trace, so first try the port: closed means rank 0 is gone.
    if rank != 0 and not agent_serves_store() and not _listening(store):
        return 0
    try:
        if not store.check([_FAILED]):
            return None
        failed = int(store.get(_FAILED))
        store.add(_DONE, 1)  # read: a failed rank 0 that serves the store may now let it go
        return failed
    except dist.DistError:
        return None


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def _listening(store: dist.Store) -> bool:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return True  # not a network store: nothing to probe
    try:
        socket.create_connection((store.host, store.port), timeout=2).close()
        return True
    except OSError:
        return False
