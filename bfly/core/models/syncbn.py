"""SyncBatchNorm2d: BatchNorm2d whose batch statistics span every process of the process group.

Written for a step that never waits for the host:
- one collective per layer forward (an all-gather of each rank's [mean, variance, count]) and one per layer
  backward (an all-reduce of [sum dy, sum dy*xhat]); no mask and no count read back: PyTorch's
  SyncBatchNorm masks empty ranks with `count_all[mask]`, a nonzero that waits for the GPU at every layer
  (pytorch#78549). Inputs are never empty (incomplete batches are dropped); an empty one is refused.
- functional collectives, which torch.compile traces into the graph instead of breaking it per layer.
- CPU tensors (gloo) as well as CUDA ones (NCCL), so multi-process CPU runs normalize like GPU runs.
It is a BatchNorm2d (same parameters, buffers and state_dict keys), so checkpoints, export and evaluation
see no difference; in eval mode, outside a process group or at world size 1 it is exactly BatchNorm2d.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]

_DIMS = (0, 2, 3)  # every dimension but the channels'
# all_gather_tensor's new name since torch 2.13 (the old one warns)
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t[None, :, None, None]


def _combine(gathered: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (mean, biased variance, count) from each rank's row [mean, variance, count] (Chan et al.:
    no sum-of-squares cancellation, so low-precision inputs with a large mean stay accurate)."""
    means, variances, counts = gathered[:, :channels], gathered[:, channels : 2 * channels], gathered[:, -1:]
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
    return mean, var, n


class _SyncBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm over the group's global batch; returns (y, mean, biased var, count)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in at least fp32, as cuDNN does
        xf = x.to(acc)
        channels = x.shape[1]
        var_l, mean_l = torch.var_mean(xf, dim=_DIMS, correction=0)
        local = torch.cat([mean_l, var_l, mean_l.new_full((1,), x.numel() // channels)])
        gathered = fc.wait_tensor(_all_gather(local, 0, group))
        mean, var, n = _combine(gathered.view(-1, 2 * channels + 1), channels)
        invstd = torch.rsqrt(var + eps)
        y = (xf - _per_channel(mean)) * _per_channel(invstd * weight) + _per_channel(bias)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        x, weight, mean, invstd, n = ctx.saved_tensors
        acc = mean.dtype
        dyf = dy.to(acc)
        xhat = (x.to(acc) - _per_channel(mean)) * _per_channel(invstd)
        sum_dy, sum_dy_xhat = dyf.sum(_DIMS), (dyf * xhat).sum(_DIMS)
        # Weight and bias gradients stay this rank's own: DDP averages them like every other gradient.
        total = fc.wait_tensor(fc.all_reduce(torch.cat([sum_dy, sum_dy_xhat]), "sum", ctx.group))
        mean_dy, mean_dy_xhat = total[: len(mean)] / n, total[len(mean) :] / n
        dx = (dyf - _per_channel(mean_dy) - xhat * _per_channel(mean_dy_xhat)) * _per_channel(invstd * weight)
        return dx.to(x.dtype), sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype), None, None


def _sync_group(process_group: Any) -> Any:
    """The group to normalize over: `process_group`, else the default one; None when there is nothing to
    synchronize (no process group, or one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics over every rank of `process_group` (None: the default group)."""

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = _sync_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:
            raise ValueError(
                f"SyncBatchNorm2d: empty input {tuple(x.shape)} on this rank: every rank needs at least one "
                "image per step (training drops incomplete batches)"
            )
        if not self.affine:
            raise ValueError("SyncBatchNorm2d needs affine=True (weight and bias), as every BatchNorm of our models")
        y, mean, var, n = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:
            self._update_running_stats(mean, var, n)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """As BatchNorm2d does: momentum (or the cumulative average when momentum is None), the unbiased
        variance, num_batches_tracked; all on the device (BatchNorm's float(num_batches_tracked) would
        read it back)."""
        assert self.num_batches_tracked is not None and self.running_mean is not None
        assert self.running_var is not None
        self.num_batches_tracked.add_(1)
        momentum: float | None = self.momentum
        factor = 1.0 / self.num_batches_tracked.to(mean.dtype) if momentum is None else momentum
        self.running_mean.copy_(factor * mean + (1 - factor) * self.running_mean)
        self.running_var.copy_(factor * var * (n / (n - 1)) + (1 - factor) * self.running_var)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a SyncBatchNorm2d holding the same parameters and
    buffers (the same tensors: an optimizer built before still updates them)."""
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
