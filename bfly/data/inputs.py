"""Builds the configured input path. Both paths give the trainer the same thing: for a rank and an
epoch, micro-batches of (normalized images, labels) on the training device."""
from __future__ import annotations

import torch

from bfly.config import Config
from bfly.data.metadata import DatasetMeta
from bfly.data.pil_input import PilEvalInput, PilTrainInput
from bfly.data.sampling import StepPlan
from bfly.data.transforms import build_eval_transform, build_train_transform


def build_train_input(cfg: Config, meta: DatasetMeta, plan: StepPlan, rank: int, device: torch.device):
    d = cfg.data
    split = meta.splits["train"]
    if d.input == "cached":
        from bfly.data.cached_input import CachedTrainInput

        return CachedTrainInput(split, cfg, plan, rank, device)
    transform = build_train_transform(d.preset, d.image_size, randaugment=d.randaugment, reprob=d.reprob)
    return PilTrainInput(split, transform, plan, rank, cfg.train.seed, device, d.workers, d.pin_memory)


def build_eval_input(cfg: Config, meta: DatasetMeta, split_name: str, rank: int, world_size: int,
                     batch_size: int, device: torch.device):
    d = cfg.data
    split = meta.splits[split_name]
    if d.input == "cached":
        from bfly.data.cached_input import CachedEvalInput

        return CachedEvalInput(split, cfg, rank, world_size, batch_size, device)
    # Eval workers sit idle during training; one or two are enough for a split of a few hundred images.
    workers = min(d.workers, 2)
    return PilEvalInput(split, build_eval_transform(d.image_size), rank, world_size, batch_size, device,
                        workers, d.pin_memory)
