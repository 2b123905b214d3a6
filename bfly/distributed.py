"""Process group set-up and the few collectives the trainer needs.

The model never sees any of this: DDP wrapping happens in bfly.stack (the device is picked there too).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from bfly.env import DistEnv


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
