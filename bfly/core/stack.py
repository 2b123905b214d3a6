"""The training stack, assembled once: device, model (SyncBN, device, channels-last), DDP, compile, AMP
policy, optimizer, criterion and Trainer. bfly.train, bfly.evaluate, bfly.predict, bfly.report,
bfly.bench and bfly.gpu_check all build through here, so a benchmark measures what training builds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn

from bfly.core.config import Config, ConfigError, DistConfig
from bfly.core.data.sampling import StepPlan
from bfly.core.data.transforms import build_mixup
from bfly.core.ema import ModelEma
from bfly.core.engine import Schedule, Trainer, unwrap
from bfly.core.models import build_model, model_options
from bfly.core.optim import build_optimizer

__all__ = [
    "AmpPolicy",
    "amp_policy",
    "build_criterion",
    "build_trainer",
    "check_ddp_plan",
    "compile_sync_bn_warning",
    "configure_backends",
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


class Notes(Protocol):
    """Where the notes of an assembly go (a training run's log)."""

    def info(self, msg: str) -> None: ...
    def warn(self, msg: str) -> None: ...


def place_model(
    model: nn.Module, cfg: Config, device: torch.device, sync_bn: bool = False, log: Notes | None = None
) -> nn.Module:
    """SyncBatchNorm (sync_bn: several processes and model.sync_bn), the device, channels-last.
    `log` receives the notes a training run prints about SyncBN."""
    if sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if log and (note := compile_sync_bn_warning(cfg.model.compile, sync_bn=True)):
                log.warn(note)
        elif log:
            log.info(
                "CPU run: SyncBatchNorm is off (PyTorch supports it on GPU modules only); "
                "each rank normalizes with its own batch statistics"
            )
    model = model.to(device)
    # Channels-last on the CPU too: there oneDNN has a fast bf16 convolution only for NHWC; NCHW in bf16
    # falls back to a reference kernel about 10x slower than fp32.
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_sync_bn_warning(compile: bool, sync_bn: bool) -> str | None:
    """model.compile with SyncBatchNorm compiles, but into many small graphs: say what it costs."""
    if not (compile and sync_bn):
        return None
    return (
        "model.compile=true with SyncBatchNorm: each SyncBN layer breaks the compiled graph "
        "(pytorch#161302; ResNet50 becomes ~53 graphs), so compiling gains little. model.sync_bn=false "
        "keeps per-GPU BatchNorm, which compiles into one graph; at 32 or more images per GPU its "
        "effect on accuracy is small"
    )


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


def wrap_model(
    model: nn.Module, cfg: Config, device: torch.device, ddp: bool, compile_backend: str = "inductor"
) -> nn.Module:
    """DDP (when `ddp`: the process group is up), then torch.compile (model.compile)."""
    if ddp:
        d = cfg.dist
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=d.bucket_cap_mb,
            gradient_as_bucket_view=d.gradient_as_bucket_view,
            static_graph=d.static_graph,
        )
        if d.comm_hook == "bf16":
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
        optimizer=build_optimizer(raw, o),
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
