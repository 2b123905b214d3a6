"""The fast input path (data.input=cached): decode once, keep the split near the GPU, augment there.

Each split is decoded once into a memory-mapped uint8 cache (bfly.core.data.decode_cache). On a GPU the
whole split is copied into device memory (1.9 GB for 12.6k images at 224 px), so a micro-batch is
a gather and a few kernels: the host only launches them. If the split does not fit
(data.cache_placement), it stays in the memory-mapped file (shared by the node's ranks through the
page cache) and each micro-batch is gathered into a reused pinned buffer and copied asynchronously. On a CPU-only machine the memory-mapped file is used directly (slow but
exact: this is how the path is tested).

Which samples a rank sees is bfly.core.data.sampling.rank_micro_batches, as for the PIL path: the same
global batches, per-sample seeds and mid-epoch resume. An epoch's indices and augmentation
parameters are computed on the host and copied to the device once, at the start of the epoch, so
the training loop never waits on the host and never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bfly.core.config import Config, DataConfig
from bfly.core.data.decode_cache import open_cache
from bfly.core.data.gpu_augment import PARAM_COLUMNS, AugmentSpec, GpuAugment, Normalize, draw_params
from bfly.core.data.metadata import Split
from bfly.core.data.sampling import StepPlan, eval_shard, rank_micro_batches, steps_per_epoch

DEVICE_SHARE = 0.25  # auto placement: the split may take this fraction of the free GPU memory


def normalized(device: torch.device) -> torch.device:
    """torch.device("cuda") is the current GPU, cuda:N: compare devices only in this form."""
    if str(device) == "cuda":  # no index
        return torch.device("cuda", torch.cuda.current_device())
    return device


class PinnedStaging:
    """Host-to-GPU copies of gathered micro-batches through a few reused pinned buffers.

    A micro-batch is gathered from the memory-mapped cache into a pinned buffer and copied to the
    GPU asynchronously. A buffer is reused two gathers later, once the event recorded after its copy
    has passed (by then the GPU is long done with it): per rank, host memory is these buffers only."""

    SLOTS = 2

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor | None] = [None] * self.SLOTS
        self.copied: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.turn = 0

    def to_device(self, source: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        slot, self.turn = self.turn, (self.turn + 1) % self.SLOTS
        if (event := self.copied[slot]) is not None:
            event.synchronize()  # this buffer's previous copy has reached the GPU
        shape = (len(index), *source.shape[1:])
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
            buffer = self.buffers[slot] = torch.empty(shape, dtype=source.dtype, pin_memory=True)
        staged = buffer[: shape[0]]
        torch.index_select(source, 0, index, out=staged)
        moved = staged.to(device, non_blocking=True)
        self.copied[slot] = event = torch.cuda.Event()
        event.record()
        return moved

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b is not None)


class ResidentSplit:
    """A split's decoded uint8 images (N, H, W, 3) and labels, where batches are gathered from."""

    def __init__(self, split: Split, data: DataConfig, device: torch.device):
        cache_dir = data.cache_dir or Path(data.root) / ".bfly-cache"
        array = open_cache(split, data.image_size, cache_dir)
        self.device = device = normalized(device)
        self.placement = placement_for(data.cache_placement, array.nbytes, device)
        # Memory-mapped: pages are read on first touch and shared by every rank of the node (page cache).
        host = torch.from_numpy(array)
        self.images = host.to(device) if self.placement == "device" else host
        self.staging = PinnedStaging() if device.type == "cuda" and self.placement == "host" else None
        self.labels = torch.tensor(split.labels, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def gather(self, index_host: torch.Tensor, index_device: torch.Tensor) -> torch.Tensor:
        """uint8 (len(index), H, W, 3) on the device; no host synchronisation."""
        if self.staging is not None:
            return self.staging.to_device(self.images, index_host, self.device)
        if self.placement == "device":
            return self.images.index_select(0, index_device)
        return self.images.index_select(0, index_host)  # CPU: straight from the memory-mapped file


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
