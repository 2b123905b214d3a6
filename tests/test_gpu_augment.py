"""Batched per-sample augmentation (bfly.core.data.gpu_augment), checked on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from bfly.core.data.gpu_augment import (
    PARAM_COLUMNS,
    AugmentSpec,
    GpuAugment,
    Normalize,
    draw_params,
    identity_params,
    seed_uniforms,
)
from bfly.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")
COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def params_with(n: int, **columns: float) -> torch.Tensor:
    p = identity_params(n)
    for name, value in columns.items():
        p[:, COL[name]] = value
    return p


def reference(images: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize, as the PIL path does."""
    return TF.normalize(images.permute(0, 3, 1, 2).float() / 255, IMAGENET_MEAN, IMAGENET_STD)


# --- per-sample parameters -------------------------------------------------------------------------


def test_seed_uniforms_are_a_pure_function_of_the_seed_in_unit_interval():
    seeds = [0, 1, 2, 2**62 + 12345]
    a, b = seed_uniforms(seeds, 10), seed_uniforms(list(reversed(seeds)), 10)[::-1]
    assert np.array_equal(a, b)  # a sample's numbers do not depend on its neighbours
    assert a.shape == (4, 10) and (a >= 0).all() and (a < 1).all()
    assert len({tuple(row) for row in a}) == 4


def test_seed_uniforms_look_uniform():
    u = seed_uniforms(np.arange(20_000), 4)
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 0.09 * u.size


def test_draw_params_stay_within_the_spec():
    spec = AugmentSpec(size=32, crop_scale=(0.25, 1.0))
    p = draw_params(np.arange(5000), spec).double()
    w, h = p[:, COL["crop_w"]], p[:, COL["crop_h"]]
    assert p.dtype == torch.float64 and p.shape == (5000, len(PARAM_COLUMNS))
    assert ((w > 0) & (w <= 1) & (h > 0) & (h <= 1)).all()
    assert (w * h >= 0.25 - 1e-6).all()  # area fraction at least crop_scale_min
    assert (p[:, COL["center_x"]].abs() <= 1 - w + 1e-6).all()  # the crop stays inside the image
    assert (p[:, COL["center_y"]].abs() <= 1 - h + 1e-6).all()
    assert (p[:, COL["angle"]].abs() <= math.radians(30) + 1e-6).all()
    assert set(p[:, COL["flip"]].tolist()) == {-1.0, 1.0}
    for name, strength in (("brightness", 0.2), ("contrast", 0.2), ("saturation", 0.2)):
        assert ((p[:, COL[name]] - 1).abs() <= strength + 1e-6).all()
    assert (p[:, COL["hue"]].abs() <= 0.1 + 1e-6).all()


def test_crop_scale_one_keeps_the_whole_image():
    p = draw_params(np.arange(200), AugmentSpec(size=32, crop_scale=(1.0, 1.0)))
    assert (p[:, COL["crop_w"]] == 1).all() and (p[:, COL["crop_h"]] == 1).all()
    assert (p[:, COL["center_x"]] == 0).all() and (p[:, COL["center_y"]] == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crop_scale": (0.0, 1.0)}, "crop scale"),
        ({"crop_scale": (0.5, 1.5)}, "crop scale"),
        ({"hue": 0.7}, "hue"),
    ],
)
def test_augment_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentSpec(size=32, **kwargs)


# --- geometry --------------------------------------------------------------------------------------


def test_identity_params_give_the_normalised_input():
    images = random_images(3, 16)
    out = GpuAugment(AugmentSpec(size=16), CPU)(images, identity_params(3))
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(images), atol=1e-5, rtol=0)


def test_flip_mirrors_left_right():
    images = random_images(2, 16)
    out = GpuAugment(AugmentSpec(size=16), CPU)(images, params_with(2, flip=-1.0))
    torch.testing.assert_close(out, reference(images).flip(3), atol=1e-5, rtol=0)


def test_crop_of_the_top_left_quadrant():
    images = random_images(2, 32)
    # Half the side in each direction, centred in the top-left quadrant; output at the crop's own size.
    params = params_with(2, crop_w=0.5, crop_h=0.5, center_x=-0.5, center_y=-0.5)
    out = GpuAugment(AugmentSpec(size=16), CPU)(images, params)
    torch.testing.assert_close(out, reference(images[:, :16, :16]), atol=1e-5, rtol=0)


def test_positive_angle_turns_counter_clockwise_like_torchvision():
    images = random_images(1, 16)
    out = GpuAugment(AugmentSpec(size=16), CPU)(images, params_with(1, angle=math.pi / 2))
    torch.testing.assert_close(out, torch.rot90(reference(images), 1, dims=(2, 3)), atol=1e-4, rtol=0)
    # Away from multiples of 90 degrees: torchvision's bilinear rotation, up to its uint8 rounding.
    out = GpuAugment(AugmentSpec(size=16), CPU)(images, params_with(1, angle=math.radians(30)))
    rotated = TF.rotate(images.permute(0, 3, 1, 2), 30, interpolation=TF.InterpolationMode.BILINEAR)
    assert (out - reference(rotated.permute(0, 2, 3, 1))).abs().mean() < 0.02


def test_output_resized_to_the_spec_size():
    out = GpuAugment(AugmentSpec(size=24), CPU)(random_images(2, 40), draw_params([1, 2], AugmentSpec(size=24)))
    assert out.shape == (2, 3, 24, 24)


# --- colour ----------------------------------------------------------------------------------------


def test_brightness_contrast_saturation_match_torchvision_per_sample():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[1.15, 0.85, 1.2, 0.0], [0.8, 1.2, 0.9, 0.0]])
    out = GpuAugment(AugmentSpec(size=8), CPU).color_jitter(images.clone(), factors)
    for i, (b, c, s, _) in enumerate(factors.tolist()):
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(images[i], b), c), s)
        # Gray weighs red 0.299 as Pillow does (the seed preset jitters PIL images); torchvision's
        # tensor functions use 0.2989, hence the tolerance.
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)


def test_hue_shift_moves_hue_the_way_torchvision_does():
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1).repeat(2, 1, 4, 4)
    factors = torch.tensor([[1, 1, 1, 0.1], [1, 1, 1, -0.1]])
    out = GpuAugment(AugmentSpec(size=4), CPU).color_jitter(red.clone(), factors)
    # Positive hue turns red towards yellow/green (more green), negative towards magenta (more blue).
    assert out[0, 1].mean() > out[0, 2].mean() and out[1, 2].mean() > out[1, 1].mean()
    assert TF.adjust_hue(red[0], 0.1)[1].mean() > TF.adjust_hue(red[0], 0.1)[2].mean()
    assert ((out >= 0) & (out <= 1)).all()


def test_zero_hue_leaves_colours_unchanged():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = GpuAugment(AugmentSpec(size=8), CPU).color_jitter(images.clone(), torch.tensor([[1.0, 1, 1, 0]] * 2))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


# --- the whole augmentation ------------------------------------------------------------------------


def test_augmentation_is_deterministic_per_seed_and_differs_across_seeds():
    spec = AugmentSpec(size=16)
    augment = GpuAugment(spec, CPU)
    images = random_images(4, 20)
    a = augment(images, draw_params([10, 11, 12, 13], spec))
    b = augment(images, draw_params([10, 11, 12, 13], spec))
    c = augment(images, draw_params([20, 21, 22, 23], spec))
    assert torch.equal(a, b)
    assert all(not torch.allclose(a[i], c[i]) for i in range(4))


def test_each_sample_is_augmented_independently_of_its_batch():
    spec = AugmentSpec(size=16)
    augment = GpuAugment(spec, CPU)
    images, params = random_images(4, 20), draw_params([5, 6, 7, 8], spec)
    whole = augment(images, params)
    for i in range(4):
        torch.testing.assert_close(augment(images[i : i + 1], params[i : i + 1])[0], whole[i], atol=1e-6, rtol=0)


def test_output_range_is_that_of_normalised_unit_images():
    spec = AugmentSpec(size=16)
    out = GpuAugment(spec, CPU)(random_images(8, 16), draw_params(range(8), spec))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.isfinite(out).all()
    assert (out >= (0 - mean) / std - 1e-5).all() and (out <= (1 - mean) / std + 1e-5).all()


def test_channels_last_output_when_asked():
    spec = AugmentSpec(size=16)
    out = GpuAugment(spec, CPU, channels_last=True)(random_images(2, 16), draw_params([1, 2], spec))
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain = GpuAugment(spec, CPU)(random_images(2, 16), draw_params([1, 2], spec))
    torch.testing.assert_close(out, plain, atol=0, rtol=0)


def test_eval_normalisation_matches_to_tensor_and_normalize():
    images = random_images(3, 8)
    torch.testing.assert_close(Normalize(CPU).from_uint8(images), reference(images), atol=1e-6, rtol=0)
