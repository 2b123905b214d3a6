"""Image transform presets (PIL image -> normalised float tensor) and the Mixup/CutMix factory.

timm is used here only for its augmentation utilities, and imported only inside the functions that
use them: importing timm costs about a second (and it imports wandb), which every rank of every
restart would pay even with the "course" preset and no mixup. Every transform first converts the image
to RGB, so grayscale, CMYK, RGBA and palette images are all valid inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from PIL import Image
from torchvision import transforms

from bfly.core.data.pil_input import to_rgb

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.data.auto_augment import AugmentOp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_PRESETS = ("course", "timm")


class ToRGB:
    """Convert a PIL image of any mode to RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return "ToRGB()"


def build_train_transform(
    preset: str,
    image_size: int,
    *,
    randaugment: str = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
) -> Callable:
    """Training transform for ``preset``; ``randaugment`` and ``reprob`` apply to "timm" only.

    "course" is the course report's recipe (config files may still call it "seed"). "timm" is timm's
    ImageNet training recipe: random resized crop, flip, RandAugment (an empty ``randaugment`` turns it
    off) and random erasing.
    """
    _check_size(image_size)
    if preset == "course":
        return transforms.Compose(
            [
                ToRGB(),
                transforms.Resize((image_size, image_size)),
                transforms.RandomHorizontalFlip(),
                transforms.RandomRotation(30),
                transforms.ColorJitter(0.2, 0.2, 0.2, 0.1),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    if preset == "timm":
        if not 0.0 <= reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {reprob}")
        from timm.data import create_transform

        timm_transform = create_transform(
            input_size=image_size,
            is_training=True,
            auto_augment=randaugment or None,
            re_prob=reprob,
            re_mode="pixel",  # timm's training-script default: erase with noise, not a constant
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        fix_zero_bit_posterize(timm_transform)
        return transforms.Compose([ToRGB(), timm_transform])
    raise ValueError(f"unknown train transform preset {preset!r}; valid presets: {list(TRAIN_PRESETS)}")


def build_eval_transform(image_size: int) -> Callable:
    _check_size(image_size)
    return transforms.Compose(
        [
            ToRGB(),
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_mixup(mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int) -> Mixup | None:
    """Batch-level Mixup/CutMix with smoothed one-hot targets, or None when both alphas are 0.

    The returned callable maps (images, int labels) to (images, soft targets of shape (B, C)),
    so the loss must accept soft targets; timm needs an even batch size (use drop_last=True).
    With None, label smoothing is the loss function's job.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def posterize_or_black(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, with keeping 0 bits giving a black image.

    timm's "PosterizeIncreasing" at magnitude 10 and "Posterize" below magnitude 2.5 ask for 0 bits.
    Pillow <= 12 then returned a black image (every bit masked off, as in the TensorFlow reference
    policies), but Pillow 13 raises ValueError, which kills a DataLoader worker mid-epoch. Black
    rather than clamping to 1 bit keeps the augmentation identical across Pillow versions.
    """
    from timm.data import auto_augment as timm_aa

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return timm_aa.posterize(img, bits_to_keep, **kwargs)


def fix_zero_bit_posterize(transform: Callable) -> None:
    """Swap posterize_or_black into the posterize ops of this one transform (not timm globally)."""
    from timm.data import auto_augment as timm_aa

    for op in _augment_ops(transform):
        if op.aug_fn is timm_aa.posterize:
            op.aug_fn = posterize_or_black


def _augment_ops(transform: Callable) -> Iterator[AugmentOp]:
    from timm.data import auto_augment as timm_aa

    if isinstance(transform, transforms.Compose):
        for inner in transform.transforms:
            yield from _augment_ops(inner)
    elif isinstance(transform, (timm_aa.RandAugment, timm_aa.AugMixAugment)):
        yield from transform.ops
    elif isinstance(transform, timm_aa.AutoAugment):
        for sub_policy in transform.policy:
            yield from sub_policy


def _check_size(image_size: object) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
