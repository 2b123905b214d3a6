"""The cached input path: decode cache (build, reuse, rebuild), batches per rank, eval shards, training."""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfly.core.config import ConfigError, load_config
from bfly.core.data.cached_input import CachedEvalInput, CachedTrainInput
from bfly.core.data.decode_cache import cache_path, open_cache
from bfly.core.data.metadata import DataError, load_metadata
from bfly.core.data.sampling import StepPlan, rank_micro_batches
from bfly.core.data.transforms import build_eval_transform

from conftest import TEST_MODEL

CPU = torch.device("cpu")
CLASSES = ("ALPHA", "BETA", "GAMMA")
SPLIT_SIZES = {"train": 18, "valid": 6, "test": 6}


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def write_csv(root: Path, split: str, rows: list[tuple[str, str, int]]) -> None:
    with open(root / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepaths", "labels", "label_id"])
        writer.writerows(rows)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """Course layout, 3 classes, non-square JPEGs (so the cache really resizes)."""
    root = tmp_path / "tiny"
    for split, n in SPLIT_SIZES.items():
        rows = []
        for i in range(n):
            label = i % len(CLASSES)
            rel = f"{split}/{CLASSES[label]}/{i:03d}.jpg"
            write_image(root / rel, seed=hash((split, i)) % 2**32)
            rows.append((rel, CLASSES[label], label))
        write_csv(root, split, rows)
    return root


def config(root: Path, cache: Path, *overrides: str):
    return load_config(
        None, [f"data.root={root}", f"data.cache_dir={cache}", "data.input=cached", "data.image_size=16", *overrides]
    )


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npy"))


# --- the decode cache ------------------------------------------------------------------------------


def test_cache_holds_the_pil_eval_transforms_pixels(tiny_root, tmp_path):
    split = load_metadata(tiny_root).splits["valid"]
    images = open_cache(split, 16, tmp_path / "cache", progress=False)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    expected = []
    for i, path in enumerate(split.paths):
        with Image.open(path) as im:
            assert np.array_equal(images[i], np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR)))
            expected.append(build_eval_transform(16)(im))  # Resize((16, 16)) + ToTensor + Normalize
    batches = list(CachedEvalInput(split, config(tiny_root, tmp_path / "cache"), 0, 1, 4, CPU).batches())
    torch.testing.assert_close(torch.cat([b for b, _ in batches]), torch.stack(expected), atol=1e-6, rtol=0)
    assert torch.cat([labels for _, labels in batches]).tolist() == list(split.labels)


def test_cache_is_built_once_then_reused(tiny_root, tmp_path, capsys):
    split = load_metadata(tiny_root).splits["train"]
    first = open_cache(split, 16, tmp_path / "cache")
    assert "decoding split 'train' (18 images at 16px)" in capsys.readouterr().err
    (path,) = cache_files(tmp_path / "cache")
    stamp = path.stat().st_mtime_ns
    second = open_cache(split, 16, tmp_path / "cache")
    assert capsys.readouterr().err == ""  # no second build
    assert path.stat().st_mtime_ns == stamp and cache_files(tmp_path / "cache") == [path]
    assert np.array_equal(first, second)


def test_a_changed_csv_rebuilds_the_cache(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    open_cache(load_metadata(tiny_root).splits["train"], 16, cache, progress=False)
    (old,) = cache_files(cache)
    with open(tiny_root / "train.csv") as f:
        lines = f.readlines()
    (tiny_root / "train.csv").write_text("".join(lines[:1] + lines[1:][::-1][:-1]))  # reversed, one row less
    split = load_metadata(tiny_root).splits["train"]
    images = open_cache(split, 16, cache, progress=False)
    (new,) = cache_files(cache)  # the stale file is gone
    assert new != old and images.shape[0] == 17
    with Image.open(split.paths[0]) as im:
        assert np.array_equal(images[0], np.asarray(im.resize((16, 16), Image.BILINEAR)))


def test_a_label_only_change_keeps_the_cache(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    open_cache(load_metadata(tiny_root).splits["train"], 16, cache, progress=False)
    (before,) = cache_files(cache)
    text = (tiny_root / "train.csv").read_text().replace(",GAMMA,2", ",DELTA,2")  # a class renamed
    (tiny_root / "train.csv").write_text(text)
    open_cache(load_metadata(tiny_root, splits=("train",)).splits["train"], 16, cache, progress=False)
    assert cache_files(cache) == [before]  # labels are not pixels: read from the CSV each run


def test_a_replaced_image_rebuilds_the_cache(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    split = load_metadata(tiny_root).splits["train"]
    before = np.array(open_cache(split, 16, cache, progress=False))
    write_image(Path(split.paths[3]), seed=999, size=(50, 20))  # new content and size
    after = open_cache(split, 16, cache, progress=False)
    assert not np.array_equal(before[3], after[3])
    assert np.array_equal(before[4], after[4])


def test_a_touched_image_rebuilds_the_cache(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    split = load_metadata(tiny_root).splits["train"]
    open_cache(split, 16, cache, progress=False)
    (before,) = cache_files(cache)
    st = os.stat(split.paths[0])
    os.utime(split.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    open_cache(split, 16, cache, progress=False)
    (after,) = cache_files(cache)
    assert after != before


def test_each_image_size_has_its_own_cache(tiny_root, tmp_path):
    split = load_metadata(tiny_root).splits["valid"]
    assert open_cache(split, 16, tmp_path / "c", progress=False).shape[1] == 16
    assert open_cache(split, 8, tmp_path / "c", progress=False).shape[1] == 8
    assert len(cache_files(tmp_path / "c")) == 2


def test_concurrent_openers_build_once(tiny_root, tmp_path, capsys):
    split = load_metadata(tiny_root).splits["train"]
    with ThreadPoolExecutor(3) as pool:  # flock excludes separate opens, as it does torchrun ranks
        arrays = list(pool.map(lambda _: open_cache(split, 16, tmp_path / "cache"), range(3)))
    assert capsys.readouterr().err.count("decoding split") == 1
    assert all(np.array_equal(arrays[0], a) for a in arrays[1:])


def test_a_killed_builds_leftover_is_removed(tiny_root, tmp_path):
    split = load_metadata(tiny_root).splits["valid"]
    cache = tmp_path / "cache"
    slot = cache_path(split, 16, cache).name.rsplit("-", 1)[0]
    cache.mkdir()
    dead = _a_dead_pid()
    leftover = cache / f"{slot}-0123456789abcdef.npy.tmp-{socket.gethostname()}-{dead}"
    other_host = cache / f"{slot}-0123456789abcdef.npy.tmp-elsewhere-{dead}"  # may be building right now
    for path in (leftover, other_host):
        path.write_bytes(b"half")
    open_cache(split, 16, cache, progress=False)
    assert not leftover.exists() and other_host.exists() and len(cache_files(cache)) == 1


def _a_dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # reaped: no process has this id until the kernel reuses it


def test_a_broken_image_is_named_and_leaves_no_cache(tiny_root, tmp_path):
    split = load_metadata(tiny_root).splits["train"]
    Path(split.paths[5]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"{split.paths[5]}: not an image"):
        open_cache(split, 16, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").glob("*.npy*")) == []


def test_an_unusable_cache_dir_is_named(tiny_root, tmp_path):
    (tmp_path / "file").write_text("")
    split = load_metadata(tiny_root).splits["valid"]
    with pytest.raises(DataError, match=r"data\.cache_dir .*file/sub: cannot create"):
        open_cache(split, 16, tmp_path / "file" / "sub", progress=False)


# --- training batches ------------------------------------------------------------------------------


def train_input(root: Path, cache: Path, batch: int, world: int, rank: int, micro: int = 0, *overrides: str):
    cfg = config(root, cache, *overrides)
    split = load_metadata(root, splits=("train",)).splits["train"]
    return CachedTrainInput(split, cfg, StepPlan.make(batch, world, micro), rank, CPU), split


@pytest.mark.parametrize("world, micro", [(1, 0), (2, 0), (3, 2), (2, 1)])
def test_batches_follow_rank_micro_batches(tiny_root, tmp_path, world, micro):
    for rank in range(world):
        inp, split = train_input(tiny_root, tmp_path / "c", 6, world, rank, micro)
        plan = StepPlan.make(6, world, micro)
        expected = list(rank_micro_batches(18, plan, rank, seed=0, epoch=1))
        got = list(inp.batches(1))
        assert inp.steps_per_epoch == 3 and inp.accum_steps == plan.accum_steps
        assert len(got) == len(expected) == 3 * plan.accum_steps
        for (images, labels), samples in zip(got, expected):
            assert images.shape == (plan.micro_batch, 3, 16, 16) and images.dtype == torch.float32
            assert labels.dtype == torch.int64
            assert labels.tolist() == [split.labels[s.index] for s in samples]
        index, _ = inp.epoch_plan(1)
        assert index.tolist() == [[s.index for s in samples] for samples in expected]


def test_an_epoch_covers_each_image_once_across_ranks(tiny_root, tmp_path):
    seen = []
    for rank in range(3):
        inp, _ = train_input(tiny_root, tmp_path / "c", 6, 3, rank)
        seen += inp.epoch_plan(0)[0].flatten().tolist()
    assert sorted(seen) == list(range(18))


def test_resuming_mid_epoch_gives_the_same_batches_bit_for_bit(tiny_root, tmp_path):
    inp, _ = train_input(tiny_root, tmp_path / "c", 6, 1, 0, 3)
    full = list(inp.batches(2))
    resumed = list(inp.batches(2, start_step=1))
    assert len(resumed) == len(full) - inp.accum_steps
    for (a, la), (b, lb) in zip(full[inp.accum_steps :], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_a_sample_is_augmented_alike_on_any_world_size(tiny_root, tmp_path):
    one, _ = train_input(tiny_root, tmp_path / "c", 6, 1, 0)
    by_index = {}
    for (images, _), index in zip(one.batches(0), one.epoch_plan(0)[0]):
        by_index.update({int(i): img for i, img in zip(index, images)})
    two, _ = train_input(tiny_root, tmp_path / "c", 6, 2, 1)
    for (images, _), index in zip(two.batches(0), two.epoch_plan(0)[0]):
        for i, img in zip(index, images):
            torch.testing.assert_close(img, by_index[int(i)], atol=1e-5, rtol=0)


def test_epochs_are_shuffled_and_augmented_differently(tiny_root, tmp_path):
    inp, _ = train_input(tiny_root, tmp_path / "c", 6, 1, 0)
    (i0, p0), (i1, p1) = inp.epoch_plan(0), inp.epoch_plan(1)
    assert not torch.equal(i0, i1)
    assert not torch.equal(p0, p1)


def test_timm_preset_erases_with_reprob(tiny_root, tmp_path):
    plain, _ = train_input(tiny_root, tmp_path / "c", 6, 1, 0)
    erased, _ = train_input(
        tiny_root, tmp_path / "c", 6, 1, 0, 0, "data.preset=timm", "data.randaugment=", "data.reprob=1.0"
    )
    random.seed(0)
    a, b = next(plain.batches(0))[0], next(erased.batches(0))[0]
    changed = (a != b).flatten(1).any(1)
    assert changed.all() and torch.isfinite(b).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("data.crop_scale_min=0",), "data.crop_scale_min: must be in \\(0, 1\\]"),
        (("data.crop_scale_min=1.5",), "data.crop_scale_min"),
        (("data.preset=timm",), "data.randaugment='rand-m9-mstd0.5-inc1': RandAugment runs on the PIL path only"),
    ],
)
def test_bad_cached_settings_name_the_key(tiny_root, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_input(tiny_root, tmp_path / "c", 6, 1, 0, 0, *overrides)


# --- evaluation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_eval_shards_cover_the_split_exactly_once(tiny_root, tmp_path, world):
    split = load_metadata(tiny_root).splits["test"]
    cfg = config(tiny_root, tmp_path / "c")
    labels = []
    for rank in range(world):
        for images, batch_labels in CachedEvalInput(split, cfg, rank, world, 2, CPU).batches():
            assert images.shape[1:] == (3, 16, 16) and len(images) <= 2
            labels += batch_labels.tolist()
    assert sorted(labels) == sorted(split.labels)


# --- training --------------------------------------------------------------------------------------


def train_args(root: Path, tmp_path: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.input=cached",
        "data.image_size=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"model.name={TEST_MODEL}",
        "train.epochs=1",
        "train.batch_size=6",
        "train.log_every=1",
        "optim.warmup_epochs=0",
        "data.mixup=0.2",
        "data.cutmix=1.0",
        "wandb.mode=disabled",
        f"run.dir={run}",
        *extra,
    ]


def test_one_epoch_of_training_on_the_cached_path_then_an_exact_mid_epoch_resume(tiny_root, tmp_path):
    from bfly.job.train import main

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(tiny_root, tmp_path, straight)) == 0
    epochs = [
        json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line
    ]
    assert len(epochs) == 1
    assert np.isfinite(epochs[0]["train_loss"]) and np.isfinite(epochs[0]["valid_loss"])

    assert main(train_args(tiny_root, tmp_path, resumed, "run.stop_after_steps=2")) == 0
    assert torch.load(resumed / "last.pt", weights_only=True)["step_in_epoch"] == 2
    assert main(train_args(tiny_root, tmp_path, resumed)) == 0
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same batches, augmentation and mixing, bit for bit
