"""Builds the configured input path. Both paths give the trainer the same thing: for a rank and an
epoch, micro-batches of (normalized images, labels) on the training device."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Protocol

import torch

from bfly.core.config import Config
from bfly.core.data.metadata import DatasetMeta
from bfly.core.data.pil_input import PilEvalInput, PilTrainInput, batch_bytes, shm_bytes
from bfly.core.data.sampling import StepPlan
from bfly.core.data.transforms import build_eval_transform, build_train_transform

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalized images, int64 labels), on the training device


class TrainInput(Protocol):
    """A rank's training batches (PilTrainInput, CachedTrainInput)."""

    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's micro-batches of `epoch` from optimizer step `start_step` on."""
        ...


class EvalInput(Protocol):
    """A rank's exact shard of an eval split (PilEvalInput, CachedEvalInput)."""

    def batches(self) -> Iterator[Batch]: ...


def build_train_input(cfg: Config, meta: DatasetMeta, plan: StepPlan, rank: int, device: torch.device) -> TrainInput:
    d = cfg.data
    split = meta.splits["train"]
    if d.input == "cached":
        from bfly.core.data.cached_input import CachedTrainInput

        return CachedTrainInput(split, cfg, plan, rank, device)
    transform = build_train_transform(d.preset, d.image_size, randaugment=d.randaugment, reprob=d.reprob)
    return PilTrainInput(split, transform, plan, rank, cfg.train.seed, device, d.workers, d.pin_memory, d.image_size)


def build_eval_input(
    cfg: Config, meta: DatasetMeta, split_name: str, rank: int, world_size: int, batch_size: int, device: torch.device
) -> EvalInput:
    d = cfg.data
    split = meta.splits[split_name]
    if d.input == "cached":
        from bfly.core.data.cached_input import CachedEvalInput

        return CachedEvalInput(split, cfg, rank, world_size, batch_size, device)
    return PilEvalInput(
        split,
        build_eval_transform(d.image_size),
        rank,
        world_size,
        batch_size,
        device,
        eval_workers(cfg),
        d.pin_memory,
        d.image_size,
    )


def eval_workers(cfg: Config) -> int:
    # Eval workers sit idle during training; one or two are enough for a split of a few hundred images.
    return min(cfg.data.workers, 2)


def shm_free() -> int | None:
    """Free bytes in /dev/shm, None where there is none (not Linux)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def shm_warning(cfg: Config, plan: StepPlan, eval_batch: int, processes_per_node: int, free: int | None) -> str | None:
    """The PIL path's workers pass batches through /dev/shm; when it fills they die with a bus error
    mid-epoch. Say so at start-up. Train and eval loaders do not prefetch at the same time."""
    d = cfg.data
    if d.input != "pil" or d.workers == 0 or free is None:
        return None
    train = shm_bytes(batch_bytes(plan.micro_batch, d.image_size), d.workers)
    evals = shm_bytes(batch_bytes(eval_batch, d.image_size), eval_workers(cfg))
    need = processes_per_node * max(train, evals)
    if need <= free:
        return None
    return (
        f"/dev/shm has {free / 2**30:.1f} GiB free, the PIL input's prefetched batches need up to "
        f"{need / 2**30:.1f} GiB ({processes_per_node} process(es) x {max(train, evals) / 2**20:.0f} MiB); "
        "DataLoader workers die with a bus error when it is full: lower data.workers or "
        "train.micro_batch_size, use data.input=cached, or give the container more (docker --shm-size)"
    )
