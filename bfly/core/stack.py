"""The training stack, assembled once: device, model (SyncBN, device, channels-last), DDP, compile, AMP
policy, optimizer, criterion and Trainer. bfly.train, bfly.evaluate, bfly.predict, bfly.report,
bfly.bench and bfly.gpu_check all build through here, so a benchmark measures what training builds.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from bfly.core.config import Config, ConfigError, DistConfig
from bfly.core.data.sampling import StepPlan
from bfly.core.data.transforms import build_mixup
from bfly.core.ema import ModelEma
from bfly.core.engine import Schedule, Trainer, unwrap
from bfly.core.models import build_model, model_options
from bfly.core.models.syncbn import SyncBatchNorm2d, convert_sync_batchnorm
from bfly.core.optim import build_optimizer

__all__ = [
    "AmpPolicy",
    "amp_policy",
    "build_criterion",
    "build_trainer",
    "check_ddp_plan",
    "configure_backends",
    "ddp_options",
    "eval_batch_size",
    "init_model",
    "pick_device",
    "place_model",
    "seed_all",
    "unwrap",
    "wrap_model",
]


def pick_device(local_rank: int | None = None, local_world_size: int = 1) -> torch.device:
    """This process's device: GPU `local_rank` of this node (None = the current one), else CPU.

    More processes on a node than visible GPUs is refused: two ranks on one GPU would make NCCL stop
    with its own "Duplicate GPU detected" error, far from the cause."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank is not None:
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            raise ConfigError(
                f"{local_world_size} processes on this node but {gpus} visible GPU(s): one process per GPU. "
                f"Start at most {gpus} (torchrun --nproc_per_node={gpus}, or SLURM --ntasks-per-node={gpus}), "
                "or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(local_rank)
    return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class AmpPolicy:
    """train.amp resolved for a device: auto = bf16 on CUDA, off (fp32) on CPU; fp16 needs a GradScaler."""

    dtype: torch.dtype | None
    needs_scaler: bool

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.needs_scaler else None


def amp_policy(amp: str, device: torch.device) -> AmpPolicy:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return AmpPolicy({"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp], amp == "fp16")


def eval_batch_size(cfg: Config, world_size: int) -> int:
    """Per-process eval batch: train.eval_batch_size, else training's micro-batch (so evaluate's numbers
    match training's to the last image)."""
    return cfg.train.eval_batch_size or cfg.train.micro_batch_size or max(cfg.train.batch_size // world_size, 1)


def configure_backends(cfg: Config, device: torch.device) -> None:
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def init_model(cfg: Config, num_classes: int) -> nn.Module:
    """The configured architecture with the run's initial weights (identical on every rank)."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    return build_model(m.name, num_classes, **{key: getattr(m, key) for key in model_options(m.name)})


def place_model(model: nn.Module, cfg: Config, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """SyncBatchNorm (sync_bn: several processes and model.sync_bn), the device, channels-last.
    Our SyncBatchNorm2d works on CPU (gloo) and GPU alike and compiles into the model's one graph."""
    if sync_bn:
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    # Channels-last on the CPU too: there oneDNN has a fast bf16 convolution only for NHWC; NCHW in bf16
    # falls back to a reference kernel about 10x slower than fp32.
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_ddp_plan(d: DistConfig, plan: StepPlan) -> None:
    """DDP options that cannot work with this step plan: refused at start-up, not at the first backward."""
    if d.static_graph and plan.world_size > 1 and plan.accum_steps > 1:
        # Reproduced with torch 2.14 (gloo): an INTERNAL ASSERT (expect_autograd_hooks_) in the first
        # no_sync backward; the pending fix notes it then silently stops all-reducing (pytorch#143580,
        # PR #187732, accelerate#3679).
        raise ConfigError(
            f"dist.static_graph=true does not work with gradient accumulation: train.batch_size={plan.batch_size} "
            f"over {plan.world_size} processes is {plan.accum_steps} micro-steps of train.micro_batch_size="
            f"{plan.micro_batch} (DDP's static graph fails under no_sync, pytorch#143580); set "
            f"dist.static_graph=false, or train.micro_batch_size={plan.batch_size // plan.world_size}"
        )


def ddp_options(model: nn.Module, d: DistConfig, device: torch.device) -> dict[str, Any]:
    """DDP's keyword arguments, those this torch's DDP takes. With SyncBatchNorm every rank computes the
    same running statistics from the same global batch, so syncing rank 0's buffers before each forward
    would only cost a collective (forward_sync_buffers, broadcast_buffers before torch 2.14); per-rank
    BatchNorm keeps rank 0's statistics as always."""
    accepted = set(inspect.signature(torch.nn.parallel.distributed.DistributedDataParallel).parameters)
    options: dict[str, Any] = {
        "device_ids": [device.index] if device.type == "cuda" else None,
        "bucket_cap_mb": d.bucket_cap_mb,
        # Gradients live in DDP's buckets (no copy); zero_grad(set_to_none=True) frees them and DDP
        # points the next backward's gradients at the buckets again.
        "gradient_as_bucket_view": d.gradient_as_bucket_view,
        "static_graph": d.static_graph,
    }
    if any(isinstance(m, SyncBatchNorm2d) for m in model.modules()):
        options["forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"] = False
    return {k: v for k, v in options.items() if k in accepted}


def wrap_model(
    model: nn.Module, cfg: Config, device: torch.device, ddp: bool, compile_backend: str = "inductor"
) -> nn.Module:
    """DDP (when `ddp`: the process group is up), then torch.compile (model.compile)."""
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, **ddp_options(model, cfg.dist, device))
        if cfg.dist.comm_hook == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    if cfg.model.compile:
        # compile of a module returns a module (OptimizedModule); torch types it as any callable
        model = cast(nn.Module, torch.compile(model, backend=compile_backend))
    return model


def build_criterion(cfg: Config, num_classes: int) -> tuple[nn.Module, Callable | None]:
    """(loss, mixup): soft-target cross-entropy behind mixup/cutmix, else label-smoothed cross-entropy."""
    mixup = build_mixup(cfg.data.mixup, cfg.data.cutmix, cfg.optim.label_smoothing, num_classes)
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), None


def build_trainer(
    cfg: Config,
    raw: nn.Module,
    device: torch.device,
    num_classes: int,
    accum_steps: int,
    steps_per_epoch: int,
    ddp: bool,
    compile_backend: str = "inductor",
) -> Trainer:
    """The Trainer around `raw` (already placed, place_model): wrapped, with its optimizer, loss, AMP,
    LR schedule over train.epochs and the EMA."""
    amp = amp_policy(cfg.train.amp, device)
    criterion, mixup = build_criterion(cfg, num_classes)
    o = cfg.optim
    schedule = Schedule(steps_per_epoch * cfg.train.epochs, round(o.warmup_epochs * steps_per_epoch), o.lr, o.min_lr)
    return Trainer(
        model=wrap_model(raw, cfg, device, ddp, compile_backend),
        optimizer=build_optimizer(raw, o, device),
        scaler=amp.scaler(device),
        schedule=schedule,
        criterion=criterion,
        device=device,
        amp_dtype=amp.dtype,
        accum_steps=accum_steps,
        clip_grad_norm=o.clip_grad_norm,
        mixup=mixup,
        ema=ModelEma(raw, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None,
        channels_last=cfg.model.channels_last,
    )


def evaluated_model(trainer: Trainer) -> nn.Module:
    """The weights training evaluates and keeps as best.pt: the EMA's when the run keeps one."""
    return trainer.ema.module if trainer.ema else unwrap(trainer.model)


def seed_all(*parts: int) -> None:
    """Python, NumPy and torch RNGs from a tuple of ints (tuples of ints hash the same in every process)."""
    seed = hash(parts) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
