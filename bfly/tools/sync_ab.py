"""CPU A/B of what a multi-process step and a checkpoint cost: BatchNorm2d vs our SyncBatchNorm2d in a
DDP training step (gloo), and a checkpoint's copy to host memory tensor by tensor vs through one reused
buffer (HostStaging). Variants alternate round by round, so load from other processes hits both alike.
Not a test: it prints figures.

    python -m bfly.tools.sync_ab --nproc 2 --model resnet50 --image-size 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bfly.core import checkpoint as ckpt
from bfly.core.config import DistConfig
from bfly.core.models import MODEL_NAMES, build_model
from bfly.core.models.syncbn import convert_sync_batchnorm
from bfly.core.stack import ddp_options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bfly.tools.sync_ab", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="gloo processes")
    p.add_argument("--model", default="resnet50", choices=MODEL_NAMES)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="images per process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per variant, alternated")
    p.add_argument("--port", type=int, default=29631)
    return p.parse_args(argv)


def _trainer(model_name: str, sync_bn: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(model_name, 10)
    if sync_bn:
        model = convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_options(model, DistConfig(), torch.device("cpu")))
    return ddp, torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, foreach=True)


def _step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    return (time.perf_counter() - start) / steps


def _copy_seconds(state: dict[str, Any], staging: ckpt.HostStaging | None) -> float:
    start = time.perf_counter()
    if staging is None:  # tensor by tensor, as checkpoints were copied before
        ckpt._rebuild(state, {i: t.detach().to("cpu", copy=True) for i, t in ckpt._tensors(state, {}).items()})
    else:
        staging.to_host(state)
    return time.perf_counter() - start


def _worker(rank: int, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.nproc)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    variants = {name: _trainer(args.model, name == "SyncBatchNorm2d") for name in ("BatchNorm2d", "SyncBatchNorm2d")}
    times: dict[str, list[float]] = {name: [] for name in (*variants, "copy per tensor", "copy staged")}
    for model, optimizer in variants.values():
        _step_seconds(model, optimizer, x, 1)  # warm-up: DDP's first step builds its buckets
    model, optimizer = variants["SyncBatchNorm2d"]
    raw = cast(nn.Module, model.module)
    state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict()}
    staging = ckpt.HostStaging()
    for round_ in range(args.rounds):
        order = list(variants.items())
        for name, (model, optimizer) in order[round_ % 2 :] + order[: round_ % 2]:  # who goes first alternates
            times[name].append(_step_seconds(model, optimizer, x, args.steps))
        times["copy per tensor"].append(_copy_seconds(state, None))
        times["copy staged"].append(_copy_seconds(state, staging))
    if rank == 0:
        out.put({name: statistics.median(t) for name, t in times.items()})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, out)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    found = out.get()
    for p in procs:
        p.join()
    print(f"{args.model}, {args.nproc} gloo processes x {args.batch_size} images at {args.image_size} px (median)")
    bn, sync = found["BatchNorm2d"], found["SyncBatchNorm2d"]
    print(f"  step with BatchNorm2d      {bn * 1e3:8.1f} ms")
    print(f"  step with SyncBatchNorm2d  {sync * 1e3:8.1f} ms   ratio {sync / bn:.3f}")
    per_tensor, staged = found["copy per tensor"], found["copy staged"]
    print(f"  checkpoint copy per tensor {per_tensor * 1e3:8.1f} ms")
    print(f"  checkpoint copy staged     {staged * 1e3:8.1f} ms   ratio {staged / per_tensor:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
