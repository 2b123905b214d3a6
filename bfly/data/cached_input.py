"""The fast input path (data.input=cached): decode once, keep the split near the GPU, augment there.

Each split is decoded once into a memory-mapped uint8 cache (bfly.data.decode_cache). On a GPU the
whole split is copied into device memory (1.9 GB for 12.6k images at 224 px), so a micro-batch is
a gather and a few kernels: the host only launches them. If the split does not fit
(data.cache_placement), it stays in pinned host memory and each micro-batch is gathered there and
copied asynchronously. On a CPU-only machine the memory-mapped file is used directly (slow but
exact: this is how the path is tested).

Which samples a rank sees is bfly.data.sampling.rank_micro_batches, as for the PIL path: the same
global batches, per-sample seeds and mid-epoch resume. An epoch's indices and augmentation
parameters are computed on the host and copied to the device once, at the start of the epoch, so
the training loop never waits on the host and never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bfly.config import Config, DataConfig
from bfly.data.decode_cache import open_cache
from bfly.data.gpu_augment import PARAM_COLUMNS, AugmentSpec, GpuAugment, Normalize, draw_params
from bfly.data.metadata import Split
from bfly.data.sampling import StepPlan, eval_shard, rank_micro_batches, steps_per_epoch

DEVICE_SHARE = 0.25  # auto placement: the split may take this fraction of the free GPU memory


class ResidentSplit:
    """A split's decoded uint8 images (N, H, W, 3) and labels, where batches are gathered from."""

    def __init__(self, split: Split, data: DataConfig, device: torch.device):
        cache_dir = data.cache_dir or Path(data.root) / ".bfly-cache"
        array = open_cache(split, data.image_size, cache_dir)
        self.device = device
        self.placement = placement_for(data.cache_placement, array.nbytes, device)
        host = torch.from_numpy(array)  # memory-mapped: pages are read on first touch
        if self.placement == "device":
            self.images = host.to(device)
        elif device.type == "cuda":
            self.images = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True).copy_(host)
        else:
            self.images = host
        self.labels = torch.tensor(split.labels, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def gather(self, index_host: torch.Tensor, index_device: torch.Tensor) -> torch.Tensor:
        """uint8 (len(index), H, W, 3) on the device; no host synchronisation."""
        if self.images.device == self.device:
            return self.images.index_select(0, index_device)
        pinned = torch.empty((len(index_host), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        # The caching host allocator does not reuse `pinned` until this copy has completed.
        torch.index_select(self.images, 0, index_host, out=pinned)
        return pinned.to(self.device, non_blocking=True)


def placement_for(choice: str, nbytes: int, device: torch.device) -> str:
    if device.type != "cuda":
        return "host"
    if choice != "auto":
        return choice
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= DEVICE_SHARE * free else "host"


def augment_spec(cfg: Config) -> AugmentSpec:
    return AugmentSpec(size=cfg.data.image_size, crop_scale=(cfg.data.crop_scale_min, 1.0))


class CachedTrainInput:
    """Micro-batches for one rank and epoch, from a given optimizer step, augmented on `device`."""

    def __init__(
        self,
        split: Split,
        cfg: Config,
        plan: StepPlan,
        rank: int,
        device: torch.device,
        store: ResidentSplit | None = None,
    ):
        self.store = store or ResidentSplit(split, cfg.data, device)
        self.plan, self.rank, self.seed, self.device = plan, rank, cfg.train.seed, device
        self.steps_per_epoch = steps_per_epoch(len(self.store), plan.batch_size)
        self.accum_steps = plan.accum_steps
        self.spec = augment_spec(cfg)
        augment = GpuAugment(self.spec, device, channels_last=device.type == "cuda" and cfg.model.channels_last)
        # With a compiled model, fuse the augmentation's dozen elementwise passes into a few kernels too.
        self.augment = torch.compile(augment.__call__) if cfg.model.compile and device.type == "cuda" else augment
        self.erase = None
        if cfg.data.preset == "timm" and cfg.data.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(cfg.data.reprob, mode="pixel", device=device)

    def epoch_plan(self, epoch: int, start_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Host tensors: indices (micro-steps, m) int64 and augmentation parameters (micro-steps, m, 10)."""
        micro = list(rank_micro_batches(len(self.store), self.plan, self.rank, self.seed, epoch, start_step))
        m = self.plan.micro_batch
        index = torch.tensor([[s.index for s in batch] for batch in micro], dtype=torch.int64).view(-1, m)
        seeds = np.array([s.seed for batch in micro for s in batch], dtype=np.uint64)
        return index, draw_params(seeds, self.spec).view(len(micro), m, len(PARAM_COLUMNS))

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index, params = self.epoch_plan(epoch, start_step)
        return self._micro_batches(index, params)

    def _micro_batches(self, index: torch.Tensor, params: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index_device, params_device = self._upload(index), self._upload(params)
        for j in range(index.shape[0]):
            images = self.augment(self.store.gather(index[j], index_device[j]), params_device[j])
            if self.erase is not None:
                images = self.erase(images)
            yield images, self.store.labels.index_select(0, index_device[j])

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is asynchronous: no wait for the previous epoch's last steps.
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)


class CachedEvalInput:
    """This rank's exact shard of a split, in fixed order: the PIL eval transform's pixels, normalised."""

    def __init__(
        self,
        split: Split,
        cfg: Config,
        rank: int,
        world_size: int,
        batch_size: int,
        device: torch.device,
        store: ResidentSplit | None = None,
    ):
        self.store = store or ResidentSplit(split, cfg.data, device)
        shard = torch.tensor(list(eval_shard(len(self.store), rank, world_size)), dtype=torch.int64)
        self.chunks = [(c, c.to(device)) for c in torch.split(shard, batch_size)]
        self.normalize = Normalize(device)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index_host, index_device in self.chunks:
            images = self.normalize.from_uint8(self.store.gather(index_host, index_device))
            yield images, self.store.labels.index_select(0, index_device)
