"""Spec of the transform presets, the zero-bit posterize fix and the Mixup factory."""

import pickle
import random
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment as timm_aa, create_transform
from torchvision import transforms

from bfly.core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToRGB,
    build_eval_transform,
    build_mixup,
    build_train_transform,
    posterize_or_black,
)

MINI_IMAGE = Path(__file__).resolve().parent.parent / "data/butterfly-mini/train/ADONIS/001.jpg"
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
ZERO_BIT_RANDAUGMENT = "rand-m10-n3-p1.0-inc1"  # PosterizeIncreasing at magnitude 10 keeps 0 bits


@pytest.fixture
def butterfly_tf() -> Image.Image:
    """A real dataset image, shrunk so that augmentation stays fast."""
    with Image.open(MINI_IMAGE) as img:
        return img.convert("RGB").resize((48, 40))  # not square, so resizing is exercised


def as_mode(img: Image.Image, mode: str, tmp_path: Path) -> Image.Image:
    if mode == "P-png":
        path = tmp_path / "palette.png"
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
        return Image.open(path)
    if mode == "P-png-transparent":
        path = tmp_path / "palette_transparent.png"
        # Per-entry alpha (bytes, not one index) is the case where Pillow warns on a direct RGB convert.
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(path, transparency=bytes(range(0, 256, 2)))
        loaded = Image.open(path)
        assert isinstance(loaded.info["transparency"], bytes)
        return loaded
    return img.convert(mode)


def posterize_ops(transform) -> list:
    """The timm posterize ops inside a transform built by this module."""
    found = []
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, transforms.Compose):
            stack.extend(t.transforms)
        elif isinstance(t, (timm_aa.RandAugment, timm_aa.AugMixAugment)):
            found += [op for op in t.ops if "Posterize" in op.name]
        elif isinstance(t, timm_aa.AutoAugment):
            found += [op for sub in t.policy for op in sub if "Posterize" in op.name]
    return found


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- presets ------------------------------------------------------------------------------------

BUILDERS = {
    "course": lambda size: build_train_transform("course", size),
    "timm": lambda size: build_train_transform("timm", size),
    "eval": build_eval_transform,
}


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "LA", "P-png", "P-png-transparent"])
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_any_image_mode_gives_a_float_rgb_tensor_of_the_requested_size(butterfly_tf, tmp_path, mode, builder, recwarn):
    img = as_mode(butterfly_tf, mode, tmp_path)
    out = BUILDERS[builder](32)(img)
    assert out.dtype == torch.float32
    assert out.shape == (3, 32, 32)
    assert torch.isfinite(out).all()
    assert not recwarn.list  # e.g. Pillow's warning about palette transparency


@pytest.mark.parametrize("size", [32, 64])
def test_timm_preset_works_at_small_sizes(butterfly_tf, size):
    transform = build_train_transform("timm", size)
    seed_everything(0)
    outputs = [transform(butterfly_tf) for _ in range(40)]
    assert all(out.shape == (3, size, size) and out.dtype == torch.float32 for out in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # it does augment


def test_timm_preset_without_randaugment_or_erasing(butterfly_tf):
    transform = build_train_transform("timm", 32, randaugment="", reprob=0.0)
    assert transform(butterfly_tf).shape == (3, 32, 32)
    assert not posterize_ops(transform)


def test_course_preset_is_the_course_reports_recipe():
    transform = build_train_transform("course", 64)
    steps = transform.transforms
    assert [type(t).__name__ for t in steps] == [
        "ToRGB",
        "Resize",
        "RandomHorizontalFlip",
        "RandomRotation",
        "ColorJitter",
        "ToTensor",
        "Normalize",
    ]
    assert steps[1].size == (64, 64)
    assert steps[3].degrees == [-30.0, 30.0]
    jitter = steps[4]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.8, 1.2),
        (0.8, 1.2),
        (0.8, 1.2),
        (-0.1, 0.1),
    )
    assert tuple(steps[6].mean) == IMAGENET_MEAN and tuple(steps[6].std) == IMAGENET_STD


def test_eval_transform_squashes_to_size_and_normalises(butterfly_tf):
    transform = build_eval_transform(40)
    out = transform(butterfly_tf)
    assert torch.equal(out, transform(butterfly_tf))  # deterministic
    expected = transforms.functional.to_tensor(butterfly_tf.resize((40, 40), Image.Resampling.BILINEAR))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out * std + mean, expected, atol=0.02)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown train transform preset 'autoaug'.*'course', 'timm'"):
        build_train_transform("autoaug", 64)


@pytest.mark.parametrize("size", [0, -8, 32.0, True, "64"])
def test_bad_image_size_is_rejected(size):
    with pytest.raises(ValueError, match="image_size"):
        build_eval_transform(size)
    with pytest.raises(ValueError, match="image_size"):
        build_train_transform("course", size)


def test_bad_erasing_probability_is_rejected():
    with pytest.raises(ValueError, match="reprob"):
        build_train_transform("timm", 64, reprob=1.5)


def test_to_rgb_keeps_rgb_images_as_they_are(butterfly_tf):
    assert ToRGB()(butterfly_tf) is butterfly_tf


def test_transforms_survive_pickling_for_dataloader_workers(butterfly_tf):
    for build in BUILDERS.values():
        transform = pickle.loads(pickle.dumps(build(32)))
        assert transform(butterfly_tf).shape == (3, 32, 32)


# --- zero-bit posterize -------------------------------------------------------------------------


def test_timm_asks_for_zero_bits_at_the_extremes_of_magnitude():
    assert timm_aa.LEVEL_TO_ARG["PosterizeIncreasing"](10, {}) == (0,)
    assert timm_aa.LEVEL_TO_ARG["Posterize"](2, {}) == (0,)


@pytest.mark.skipif(not PILLOW_13, reason="Pillow < 13 posterizes 0 bits to black instead of raising")
def test_without_the_fix_pillow_13_rejects_zero_bits(butterfly_tf):
    with pytest.raises(ValueError, match="bits"):
        ImageOps.posterize(butterfly_tf, 0)
    with pytest.raises(ValueError, match="bits"):
        timm_aa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(butterfly_tf)


@pytest.mark.skipif(not PILLOW_13, reason="Pillow < 13 posterizes 0 bits to black instead of raising")
def test_without_the_fix_timms_transform_crashes_on_pillow_13(butterfly_tf):
    transform = create_transform(32, is_training=True, auto_augment=ZERO_BIT_RANDAUGMENT, interpolation="bicubic")
    seed_everything(0)
    with pytest.raises(ValueError, match="bits"):
        for _ in range(100):
            transform(butterfly_tf)


def test_with_the_fix_the_same_transform_runs_and_matches_pillow_12(butterfly_tf):
    # Same settings and seed for both: they draw the same random numbers image by image, so they
    # agree up to the first zero-bit posterize, where plain timm raises on Pillow 13 (and gives
    # black on Pillow 12, which the fixed transform must match).
    settings = {"auto_augment": ZERO_BIT_RANDAUGMENT, "re_prob": 0.0, "re_mode": "pixel", "interpolation": "bicubic"}
    plain = create_transform(32, is_training=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, **settings)
    fixed = build_train_transform("timm", 32, randaugment=ZERO_BIT_RANDAUGMENT, reprob=0.0)
    seed_everything(0)
    fixed_outputs = [fixed(butterfly_tf) for _ in range(100)]
    seed_everything(0)
    plain_outputs = []
    try:
        for _ in range(100):
            plain_outputs.append(plain(butterfly_tf))
    except ValueError as error:
        assert PILLOW_13 and "bits" in str(error)
    assert len(plain_outputs) < 100 if PILLOW_13 else len(plain_outputs) == 100
    assert all(torch.equal(p, f) for p, f in zip(plain_outputs, fixed_outputs))


def test_zero_bits_give_a_black_image_as_on_pillow_12(butterfly_tf):
    out = posterize_or_black(butterfly_tf, 0)
    assert (out.mode, out.size) == (butterfly_tf.mode, butterfly_tf.size)
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.mark.parametrize("bits", [1, 4, 7, 8])
def test_other_bit_counts_posterize_as_timm_does(butterfly_tf, bits):
    assert posterize_or_black(butterfly_tf, bits).tobytes() == timm_aa.posterize(butterfly_tf, bits).tobytes()


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m1-inc0", "v0", "originalr", "augmix-m5"])
def test_every_posterize_op_of_every_timm_policy_is_fixed(butterfly_tf, policy):
    ops = posterize_ops(build_train_transform("timm", 32, randaugment=policy))
    assert ops
    assert all(op.aug_fn is posterize_or_black for op in ops)
    op = ops[0]
    op.level_fn, op.prob = (lambda *_: (0,)), 1.0  # force the zero-bit case on this op
    assert op(butterfly_tf).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_the_fix_stays_local_and_survives_pickling():
    fixed = pickle.loads(pickle.dumps(build_train_transform("timm", 32)))
    assert all(op.aug_fn is posterize_or_black for op in posterize_ops(fixed))
    # timm itself, and transforms built with it directly, are untouched.
    assert timm_aa.NAME_TO_OP["PosterizeIncreasing"] is timm_aa.posterize
    plain = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    assert all(op.aug_fn is timm_aa.posterize for op in posterize_ops(plain))


# --- mixup --------------------------------------------------------------------------------------


def test_no_mixup_when_both_alphas_are_zero():
    assert build_mixup(0.0, 0.0, 0.1, 10) is None


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_gives_smoothed_soft_targets(mixup_alpha, cutmix_alpha):
    mixup = build_mixup(mixup_alpha, cutmix_alpha, 0.1, 10)
    assert isinstance(mixup, Mixup)
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 3, 3, 9])
    mixed, targets = mixup(images.clone(), labels)
    assert mixed.shape == images.shape
    assert targets.shape == (4, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing leaves no class at zero


@pytest.mark.parametrize(
    "args, message",
    [
        ((-0.1, 0.0, 0.1, 10), "alpha"),
        ((0.8, -1.0, 0.1, 10), "alpha"),
        ((0.8, 0.0, 1.0, 10), "label_smoothing"),
        ((0.8, 0.0, -0.1, 10), "label_smoothing"),
        ((0.8, 0.0, 0.1, 1), "num_classes"),
    ],
)
def test_bad_mixup_settings_are_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        build_mixup(*args)
