"""Training augmentation of a batch of uint8 images, per sample, with torch ops (GPU or CPU).

The course preset's family, in batch: random-resized crop, rotation and horizontal flip in one
`affine_grid`/`grid_sample` pass, then colour jitter and normalisation. Each sample's parameters
come from its `Sample.seed` through a counter-based hash (splitmix64), not from a random
generator's state: the same sample in the same epoch gets the same augmentation on any rank, in
any batch, after any resume.

Differences from the PIL course preset (bfly.core.data.transforms): a random-resized crop is added
(area fraction in [crop_scale_min, 1], aspect ratio in [3/4, 4/3]; crop_scale_min = 1 turns it
off); rotation resamples bilinearly instead of nearest-neighbour; colour jitter applies brightness,
contrast, saturation, hue in this fixed order rather than a random order, and shifts hue by a
rotation in YIQ space rather than in HSV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bfly.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

PARAM_COLUMNS = (
    "crop_w",
    "crop_h",
    "center_x",
    "center_y",
    "angle",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
)
# crop_w/crop_h: half-extent of the crop in normalised coordinates (1 = the whole side);
# center_x/center_y in [-1, 1]; angle in radians; flip is -1 (mirror) or +1.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Pillow computes it (the course preset jitters PIL images)


@dataclass(frozen=True)
class AugmentSpec:
    """What to draw per sample; the defaults are the course preset's strengths."""

    size: int
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_deg: float = 30.0
    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {self.hue}")


def seed_uniforms(seeds: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) floats in [0, 1): the first `count` splitmix64 outputs of each seed."""
    state = np.asarray(seeds, dtype=np.uint64)[:, None] + np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
    z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_params(seeds: Sequence[int] | np.ndarray, spec: AugmentSpec) -> torch.Tensor:
    """(len(seeds), len(PARAM_COLUMNS)) float32 on the host; a pure function of seeds and spec."""
    u = seed_uniforms(seeds, len(PARAM_COLUMNS))
    area = spec.crop_scale[0] + (spec.crop_scale[1] - spec.crop_scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])
    ratio = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    crop_w, crop_h = np.sqrt(area * ratio), np.sqrt(area / ratio)
    # A crop that does not fit becomes the whole image: torchvision's fallback, without its 10 retries.
    fits = (crop_w <= 1) & (crop_h <= 1)
    crop_w, crop_h = np.where(fits, crop_w, 1.0), np.where(fits, crop_h, 1.0)
    columns = [
        crop_w,
        crop_h,
        (2 * u[:, 2] - 1) * (1 - crop_w),
        (2 * u[:, 3] - 1) * (1 - crop_h),
        np.deg2rad(spec.rotation_deg * (2 * u[:, 4] - 1)),
        np.where(u[:, 5] < spec.flip_p, -1.0, 1.0),
        1 + spec.brightness * (2 * u[:, 6] - 1),
        1 + spec.contrast * (2 * u[:, 7] - 1),
        1 + spec.saturation * (2 * u[:, 8] - 1),
        spec.hue * (2 * u[:, 9] - 1),
    ]
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))


def identity_params(n: int) -> torch.Tensor:
    """Parameters that leave an image unchanged (whole image, no rotation, no flip, no jitter)."""
    return torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]).repeat(n, 1)


class GpuAugment:
    """The per-sample training augmentation; holds its constants on the device, so a call copies nothing.

    Written as few full-image passes as possible (lerp for blends, matmuls for channel mixing):
    on a GPU the cost is memory traffic, and every pass over a 256 x 3 x 224 x 224 batch counts.
    """

    def __init__(self, spec: AugmentSpec, device: torch.device, channels_last: bool = False):
        self.spec = spec
        self.normalize = Normalize(device, channels_last)
        self.gray = torch.tensor([_GRAY], device=device)  # (1, 3)
        self.hue_basis = _hue_basis().to(device)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) + params (B, 10) on the device -> normalised float32 (B, 3, size, size)."""
        size = self.spec.size
        x = images.permute(0, 3, 1, 2).float()
        grid = F.affine_grid(affine_theta(params), [x.shape[0], 3, size, size], align_corners=False)
        # Outside the source image the fill is black, as in torchvision's RandomRotation.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).contiguous()
        x = self.color_jitter(x, params[:, 6:10], scale=1 / 255)
        return self.normalize(x)

    def color_jitter(self, x: torch.Tensor, factors: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """In place on float images in [0, 1/scale]; factors (B, 4): brightness, contrast, saturation, hue.

        Each step clamps to [0, 1], as torchvision's do.
        """
        b, c, h, w = x.shape
        brightness, contrast, saturation, hue = (f.view(b, 1, 1, 1) for f in factors.unbind(1))
        x = x.mul_(brightness * scale).clamp_(0, 1)
        x = torch.lerp(self._gray(x).mean(dim=(1, 2, 3), keepdim=True), x, contrast).clamp_(0, 1)
        x = torch.lerp(self._gray(x), x, saturation).clamp_(0, 1)
        angle = hue.view(b, 1, 1) * (2 * math.pi)
        rotate = self.hue_basis[0] + torch.cos(angle) * self.hue_basis[1] + torch.sin(angle) * self.hue_basis[2]
        return torch.bmm(rotate, x.view(b, c, h * w)).view(b, c, h, w).clamp_(0, 1)

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return torch.matmul(self.gray, x.view(b, c, h * w)).view(b, 1, h, w)


class Normalize:
    """ImageNet mean/std in one pass, with the constants already on the device.

    With channels_last the result is written in that layout, which saves the model a copy.
    """

    def __init__(self, device: torch.device, channels_last: bool = False):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.scale = 1 / std
        self.shift = -torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor ignores the layout of an out= tensor
            return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=self.memory_format)
        out = torch.empty_like(x, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale, out=out)

    def from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Eval: uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W), as ToTensor + Normalize."""
        return self(images.permute(0, 3, 1, 2).float().div_(255))


def affine_theta(params: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3): output -> source coordinates, crop (scale, offset) . flip . rotation.

    A positive angle turns the picture counter-clockwise, as torchvision's rotate does (y points down).
    """
    w, h, cx, cy, angle, flip = params[:, :6].unbind(1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    row_x = torch.stack([w * flip * cos, -w * flip * sin, cx], dim=1)
    row_y = torch.stack([h * sin, h * cos, cy], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def _hue_basis() -> torch.Tensor:
    """(3, 3, 3) A, B, C with A + cos(t) B + sin(t) C = the RGB matrix that rotates YIQ's chroma by t."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    from_yiq = torch.linalg.inv(to_yiq)
    keep_luma = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    cos_part = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    sin_part = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    return torch.stack([from_yiq @ m @ to_yiq for m in (keep_luma, cos_part, sin_part)]).float()
