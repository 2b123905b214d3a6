"""train_one_epoch and evaluate: the loops, with no knowledge of where batches come from."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bfly.core import distributed
from bfly.core.optim import lr_at, set_lr


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int
    base_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)


@dataclass
class TrainState:
    """Everything that changes during training and must survive a resume."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    # Running sums of the current epoch (tensors on device: no host sync per step).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def next_epoch(self) -> dict[str, torch.Tensor]:
        """Moves to the start of the next epoch; returns the running sums of the epoch that ended."""
        sums, self.sums = self.sums, {k: torch.zeros_like(v) for k, v in self.sums.items()}
        self.epoch += 1
        self.step_in_epoch = 0
        return sums


@dataclass
class Trainer:
    model: nn.Module  # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: Schedule
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    accum_steps: int
    clip_grad_norm: float
    mixup: Callable | None = None
    ema: Any = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, sync: bool, sums: dict) -> None:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        no_sync = getattr(self.model, "no_sync", None)
        # Skip the gradient all-reduce on non-final micro-steps: it is redone on the final one anyway.
        with contextlib.nullcontext() if sync or no_sync is None else no_sync():
            with self.autocast():
                logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
            (self.scaler.scale(loss / self.accum_steps) if self.scaler else loss / self.accum_steps).backward()
        n = labels.numel()
        sums["loss"] += loss.detach().double() * n
        top5 = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices
        sums["correct"] += (top5[:, 0] == labels).sum()
        sums["correct5"] += (top5 == labels[:, None]).any(1).sum()
        sums["count"] += n

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(unwrap(self.model))


def device_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far: CUDA kernels run
    asynchronously, so an unsynchronised clock times the host's queueing, not the training."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def new_sums(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "loss": torch.zeros((), dtype=torch.float64, device=device),
        "correct": torch.zeros((), dtype=torch.int64, device=device),
        "correct5": torch.zeros((), dtype=torch.int64, device=device),
        "count": torch.zeros((), dtype=torch.int64, device=device),
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile(DDP(model)) (compile wraps DDP: unwrap in that order)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Window:
    """The steps since the last log point (or the epoch's start) as this rank's host counted them, with no
    wait for the device: on a GPU the host may be ahead by the work still queued when `ended` is taken."""

    started: float  # time.perf_counter() at its start
    ended: float  # at the log point
    images: int
    steps: int
    data_wait_s: float  # time spent waiting for the next batch
    lr: float


@dataclass
class StepHooks:
    """Called by train_one_epoch; return True from `should_stop` to end the epoch early."""

    every_n: int
    # At a log point; returns when the window's figures were read back from the device: the next one starts then.
    on_log: Callable[[TrainState, Window], float]
    should_stop: Callable[[TrainState, bool], bool]  # (state, at_log_point) -> stop now?
    on_step: Callable[[TrainState], None]
    after_backward: Callable[[], None] | None = None  # after each step's gradient all-reduce (bfly.health)


def train_one_epoch(trainer: Trainer, state: TrainState, batches, hooks: StepHooks) -> bool:
    """Runs from state.step_in_epoch to the epoch's end. Returns False if stopped early."""
    trainer.model.train()
    micro = 0
    # The host's clock, not the device's: nothing is queued on the device at an epoch's start (the last
    # epoch's end read its figures back), and each log point's read-back restarts the window's clock.
    images_seen, steps_seen, t0, wait = 0, 0, time.perf_counter(), 0.0
    t_fetch = time.perf_counter()
    for images, labels in batches:
        wait += time.perf_counter() - t_fetch
        if micro == 0:
            set_lr(trainer.optimizer, trainer.schedule.lr(state.global_step))
        micro += 1
        sync = micro == trainer.accum_steps
        trainer.micro_step(images, labels, sync, state.sums)
        images_seen += labels.numel()
        if sync:
            if hooks.after_backward is not None:
                hooks.after_backward()
            micro = 0
            steps_seen += 1
            trainer.optimizer_step()
            state.global_step += 1
            state.step_in_epoch += 1
            at_log = state.global_step % hooks.every_n == 0
            if at_log:
                lr = trainer.optimizer.param_groups[0]["lr"]
                window = Window(t0, time.perf_counter(), images_seen, steps_seen, wait, lr)
                t0 = hooks.on_log(state, window)
                images_seen, steps_seen, wait = 0, 0, 0.0
            hooks.on_step(state)
            if hooks.should_stop(state, at_log):
                return False
        t_fetch = time.perf_counter()
    return True


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Exact over the whole split: each rank evaluates its own shard, counts are summed.

    Runs the plain module, never the torch.compile'd or DDP wrapper: compiled evaluation recompiles
    (grad mode changes, and the last, smaller batch adds a dynamic-shape graph), and eval splits are
    small (1,000 images of 13.6k), so eager evaluation costs less than compiling for it."""
    model = unwrap(model)
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    k = min(5, num_classes)
    for images, labels in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        # Not bincount: its output size depends on the values, so on CUDA it reads them back each batch.
        confusion.index_put_((labels * num_classes + logits.argmax(1),), torch.ones_like(labels), accumulate=True)
        top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
    for t in (confusion, loss_sum, top5):
        distributed.all_reduce_sum(t)
    return summarize(confusion.view(num_classes, num_classes).cpu(), loss_sum.item(), int(top5.item()))


def summarize(confusion: torch.Tensor, loss_sum: float, top5_correct: int) -> dict[str, Any]:
    n = int(confusion.sum())
    per_class_n = confusion.sum(1)
    per_class = (confusion.diag().double() / per_class_n.clamp(min=1)).tolist()
    return {
        "count": n,
        "loss": loss_sum / max(n, 1),
        "top1": int(confusion.diag().sum()) / max(n, 1),
        "top5": top5_correct / max(n, 1),
        "per_class": per_class,
        "confusion": confusion,
    }
