"""Our hand-written models. The registry below is the one list of model names: the config's
model.name choices, bfly.bench and bfly.evaluate read it. It imports no torch, so that the config
(read on a login node by launch.submit) can list the names; a model's module is imported when built."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# name -> (module, constructor, fixed keywords, model.* config keys the constructor takes)
_REGISTRY: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...]]] = {
    "resnet50": ("bfly.core.models.resnet", "resnet50", {}, ("zero_init_residual",)),
    "vgg19": ("bfly.core.models.vgg", "vgg19", {"batch_norm": False}, ("dropout",)),
    "vgg19_bn": ("bfly.core.models.vgg", "vgg19", {"batch_norm": True}, ("dropout",)),
    # ResNet-50 cut down to ~34k parameters: for quick try-outs of the commands, and the tests of the plumbing.
    "resnet_tiny": ("bfly.core.models.resnet", "resnet_tiny", {}, ("zero_init_residual",)),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_options(name: str) -> tuple[str, ...]:
    """The model.* config keys model `name` is built with (e.g. ("dropout",))."""
    return _REGISTRY[name][3]


def build_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Build model `name`; extra keywords go to its constructor (e.g. dropout, zero_init_residual)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    module, constructor, fixed, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), constructor)(num_classes=num_classes, **fixed, **kw)


def __getattr__(name: str) -> Any:  # `from bfly.models import resnet50, vgg19`: the constructors, imported now
    if name in ("resnet50", "resnet_tiny", "vgg19"):
        return getattr(importlib.import_module(f"bfly.core.models.{name[:3] if name == 'vgg19' else 'resnet'}"), name)
    raise AttributeError(f"module 'bfly.core.models' has no attribute {name!r}")


__all__ = ["MODEL_NAMES", "build_model", "model_options", "resnet50", "resnet_tiny", "vgg19"]
