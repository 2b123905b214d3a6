"""The reference input path: Pillow decode + torchvision/timm transforms in DataLoader workers."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from bfly.core.data.metadata import DataError, Split
from bfly.core.data.sampling import Sample, StepPlan, eval_shard, rank_micro_batches, steps_per_epoch
from bfly.core.stopping import ignore_stop_signals, signals_blocked

# Pillow's decompression-bomb warning does not say which file it is about: open_rgb gives its own,
# naming the file. Pillow's message starts with "Image size", ours with the path.
warnings.filterwarnings("ignore", message="Image size", category=Image.DecompressionBombWarning)

# An image under 1/8 of data.image_size on a side is blown up 8x or more: a thumbnail or an icon, rarely
# the photo that was meant.
SMALL_FRACTION = 8


class ImageError(DataError):
    """An image file that cannot be read or decoded; the message names it."""


def open_rgb(path: str) -> Image.Image:
    """The picture as the camera saw it, in RGB, decoded fully now: a bad file fails here with its name,
    not later inside a transform or a DataLoader worker.

    Over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 Mpx) an image is decoded with a
    warning; over twice the limit it is refused, as Pillow does. Both messages name the file.
    """
    try:
        with Image.open(path) as im:
            _warn_if_huge(path, im.size)
            im.load()
            # Phone photos store the sensor's pixels plus an EXIF orientation tag: without it a
            # portrait photo reaches the model lying on its side.
            ImageOps.exif_transpose(im, in_place=True)
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except PermissionError as e:
        raise ImageError(f"{path}: cannot read image file ({e.strerror})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from None


def _warn_if_huge(path: str, size: tuple[int, int]) -> None:
    if Image.MAX_IMAGE_PIXELS and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        warnings.warn(
            f"{path}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels is over Pillow's "
            f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}; decoding it anyway "
            "(over twice the limit it would be refused)",
            Image.DecompressionBombWarning,
            stacklevel=3,
        )


def too_small(size: tuple[int, int], image_size: int) -> bool:
    return min(size) * SMALL_FRACTION < image_size


def small_images_warning(found: list[str], image_size: int, limit: int = 5) -> str:
    """One line for the images too_small found, each given as "path (WxH)"."""
    listed = "; ".join(found[:limit]) + (f"; and {len(found) - limit} more" if len(found) > limit else "")
    return (
        f"{len(found)} image(s) smaller than 1/{SMALL_FRACTION} of data.image_size={image_size} on a side, "
        f"each blown up {SMALL_FRACTION}x or more: {listed}"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: the one conversion every input path and transform uses."""
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit samples (e.g. a 16-bit grayscale PNG): convert("RGB") would clip them at 255, a white picture.
        pixels = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        # Pillow warns when a palette image with transparency is converted straight to RGB.
        image = image.convert("RGBA")
    return image.convert("RGB")


class ImageDataset(Dataset):
    """Items are `Sample`s (train: seeded augmentation) or plain indices (eval)."""

    def __init__(self, split: Split, transform: Callable):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, item: Sample | int) -> tuple[torch.Tensor, int]:
        if isinstance(item, Sample):
            image = open_rgb(self.split.paths[item.index])
            return _seeded(item.seed, self.transform, image), self.split.labels[item.index]
        return self.transform(open_rgb(self.split.paths[item])), self.split.labels[item]


def _seeded(seed: int, transform: Callable, image: Image.Image) -> torch.Tensor:
    # Same sample, same epoch -> same augmentation, whichever worker or rank draws it: this is what
    # makes a resumed run bit-identical to an uninterrupted one.
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        out = transform(image)
    random.setstate(state)
    return out


def _worker_init(worker_id: int) -> None:
    ignore_stop_signals()  # a signal to the process group is the trainer's to handle (bfly.stopping)
    info = torch.utils.data.get_worker_info()
    assert info is not None  # called in a loader worker
    np.random.seed(info.seed % 2**32)
    random.seed(info.seed)


class _RankBatches:
    """Batch sampler whose position is set before each pass; lets the DataLoader keep its workers."""

    def __init__(self, n: int, plan: StepPlan, rank: int, seed: int):
        self.n, self.plan, self.rank, self.seed = n, plan, rank, seed
        self.epoch, self.start_step = 0, 0

    def __iter__(self) -> Iterator[list[Sample]]:
        return rank_micro_batches(self.n, self.plan, self.rank, self.seed, self.epoch, self.start_step)

    def __len__(self) -> int:
        return (steps_per_epoch(self.n, self.plan.batch_size) - self.start_step) * self.plan.accum_steps


# Workers hand their batches over through shared memory (/dev/shm): at 224 px a float32 batch of
# 256 is 154 MB, so 4 workers x 4 prefetched batches would hold 2.4 GB per process, 10 GB on a
# 4-GPU node. Prefetch is sized to keep one loader's batches under this budget.
PREFETCH_BUDGET = 2**30


def batch_bytes(batch_size: int, image_size: int) -> int:
    """A collated batch of float32 (3, image_size, image_size) images."""
    return batch_size * 3 * image_size * image_size * 4


def prefetch_factor(nbytes: int, workers: int, budget: int = PREFETCH_BUDGET) -> int | None:
    """Batches each worker prepares ahead: 4, fewer when workers x factor x batch would pass the
    budget, never under 2 (one handed over while the next is made). None without workers."""
    if workers == 0:
        return None
    return max(2, min(4, budget // (workers * nbytes)))


def shm_bytes(nbytes: int, workers: int) -> int:
    """Shared memory one loader's prefetched batches hold at most."""
    return workers * (prefetch_factor(nbytes, workers) or 0) * nbytes


def _loader(
    dataset: Dataset, batches: Iterable[list[Sample]] | Iterable[list[int]], workers: int, pin: bool, nbytes: int
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor(nbytes, workers),
    )


def _to(device: torch.device, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    with signals_blocked():  # workers are forked here (first pass): see bfly.stopping
        batches = iter(loader)
    for images, labels in batches:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class PilTrainInput:
    """Micro-batches for one rank and epoch, from a given optimizer step, already on `device`."""

    def __init__(
        self,
        split: Split,
        transform: Callable,
        plan: StepPlan,
        rank: int,
        seed: int,
        device: torch.device,
        workers: int,
        pin_memory: bool,
        image_size: int = 224,
    ):
        dataset = ImageDataset(split, transform)
        self.sampler = _RankBatches(len(dataset), plan, rank, seed)
        self.loader = _loader(
            dataset,
            self.sampler,
            workers,
            pin_memory and device.type == "cuda",
            batch_bytes(plan.micro_batch, image_size),
        )
        self.device = device
        self.steps_per_epoch = steps_per_epoch(len(dataset), plan.batch_size)
        self.accum_steps = plan.accum_steps

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        return _to(self.device, self.loader)


class PilEvalInput:
    """This rank's exact shard of a split, in fixed order."""

    def __init__(
        self,
        split: Split,
        transform: Callable,
        rank: int,
        world_size: int,
        batch_size: int,
        device: torch.device,
        workers: int,
        pin_memory: bool,
        image_size: int = 224,
    ):
        dataset = ImageDataset(split, transform)
        shard = list(eval_shard(len(dataset), rank, world_size))
        plan = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
        self.loader = _loader(
            dataset, plan, workers, pin_memory and device.type == "cuda", batch_bytes(batch_size, image_size)
        )
        self.device = device

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _to(self.device, self.loader)
