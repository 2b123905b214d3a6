"""Optimizer construction and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from bfly.core.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BN scales and biases only hurts accuracy."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def implementation(name: str, device: torch.device) -> str:
    """How the optimizer steps: "fused" (one kernel for all parameters) on CUDA where this torch has it,
    else "foreach" (one kernel per operation over all parameters). Fused matters for fp16 beyond speed:
    GradScaler hands a fused optimizer its inf check on the device instead of reading it back each step."""
    cls = _OPTIMIZERS[name]
    if device.type == "cuda" and "fused" in inspect.signature(cls).parameters:
        return "fused"
    return "foreach"


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """optim.name over param_groups, with implementation(name, device) (the parameters' device when None)."""
    if cfg.name not in _OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")
    groups = param_groups(model, cfg.weight_decay)
    device = device or next(model.parameters()).device
    kernel = {implementation(cfg.name, device): True}
    if cfg.name == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, **kernel)
    beta1, beta2 = cfg.betas  # two values: config.validate checks
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2), **kernel)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine to min_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
