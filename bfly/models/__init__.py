"""Our hand-written models; `build_model` maps a config name to a constructor."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from bfly.models.resnet import resnet50
from bfly.models.vgg import vgg19

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": lambda num_classes, **kw: resnet50(num_classes=num_classes, **kw),
    "vgg19": lambda num_classes, **kw: vgg19(batch_norm=False, num_classes=num_classes, **kw),
    "vgg19_bn": lambda num_classes, **kw: vgg19(batch_norm=True, num_classes=num_classes, **kw),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Build model `name`; extra keywords go to its constructor (e.g. dropout, zero_init_residual)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes, **kw)


__all__ = ["MODEL_NAMES", "build_model", "resnet50", "vgg19"]
