"""Which samples each rank sees, step by step.

DistributedSampler semantics (each rank its own shard per epoch, a new shuffle each epoch), but
defined per *global* batch so that a run can stop mid-epoch and resume at a step, and resume on a
different world size: global batch k of an epoch is the same set of samples whatever the world
size; each rank takes its slices of it, one per micro-step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bfly.core.config import ConfigError


@dataclass(frozen=True)
class Sample:
    index: int
    seed: int  # seeds this sample's augmentation: same image, same epoch -> same crop, on any rank


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step's global batch is split: world_size ranks x accum_steps micro-batches."""

    batch_size: int
    world_size: int
    accum_steps: int

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world_size * self.accum_steps)

    @staticmethod
    def make(batch_size: int, world_size: int, micro_batch_size: int) -> StepPlan:
        """The plan of train.batch_size and train.micro_batch_size on `world_size` processes; ConfigError
        when they do not divide (a user's config meeting this launch's world size)."""
        per_rank, rest = divmod(batch_size, world_size)
        if rest:
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by the world size {world_size}")
        micro = micro_batch_size or per_rank
        accum, rest = divmod(per_rank, micro)
        if rest or accum == 0:
            raise ConfigError(
                f"train.batch_size={batch_size} over {world_size} process(es) is {per_rank} per process, "
                f"not a multiple of train.micro_batch_size={micro}"
            )
        return StepPlan(batch_size, world_size, accum)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size  # drop_last: every step sees a full global batch


def rank_micro_batches(
    n: int, plan: StepPlan, rank: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[list[Sample]]:
    perm = epoch_permutation(n, seed, epoch).tolist()
    m = plan.micro_batch
    for step in range(start_step, steps_per_epoch(n, plan.batch_size)):
        base = step * plan.batch_size
        for a in range(plan.accum_steps):
            lo = base + (a * plan.world_size + rank) * m
            yield [Sample(i, sample_seed(seed, epoch, i)) for i in perm[lo : lo + m]]


def eval_shard(n: int, rank: int, world_size: int) -> range:
    """Exact sharding for evaluation: no padding, no sample twice, any world size."""
    return range(rank, n, world_size)
