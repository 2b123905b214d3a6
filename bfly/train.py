"""Train our VGG19 / ResNet50 on the butterfly data, on one process or many.

    python -m bfly.train --config configs/demo_cpu.yaml                     # one process
    torchrun --nproc_per_node=2 -m bfly.train --config configs/demo_cpu.yaml
    torchrun --nproc_per_node=4 -m bfly.train --config configs/resnet50.yaml train.epochs=60
    python -m bfly.train --help                                             # every config key

A run directory (run.dir) holds config.yaml, metrics.jsonl, train.log, last.pt and best.pt.
With run.resume=auto (the default) a run restarted on the same directory continues where its
last checkpoint left off, mid-epoch included. SIGTERM, SIGUSR1 or SIGUSR2 (submitit's) stop the run
with a checkpoint at the current step.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bfly import checkpoint as ckpt
from bfly import distributed
from bfly.config import Config, ConfigError, dump_yaml, help_text, load_config, run_dir_of, to_dict
from bfly.data.inputs import build_eval_input, build_train_input
from bfly.data.metadata import DataError, DatasetMeta, load_metadata
from bfly.data.sampling import StepPlan
from bfly.data.transforms import build_mixup
from bfly.engine import Schedule, StepHooks, Trainer, TrainState, evaluate, new_sums, train_one_epoch
from bfly.ema import ModelEma
from bfly.env import DistEnv, dist_env
from bfly.models import build_model
from bfly.optim import build_optimizer
from bfly.runlog import RunLog, truncate_metrics
from bfly.stopping import StopRequest

USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bfly.train", description=__doc__.split("\n")[0],
        epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check", action="store_true",
                        help="preflight: validate config and data (decode every image), print the plan, "
                             "exit 0 or 2; writes nothing (bfly/preflight.py)")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="with --check: the real run's world size (default: this launch's, or WORLD_SIZE)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.nproc is not None and not args.check:
        parser.error("--nproc goes with --check (training takes its world size from torchrun or SLURM)")
    return args


def seed_all(*parts: int) -> None:
    seed = hash(parts) % 2**31  # tuples of ints hash deterministically across processes
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_setup(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return None, None
    if amp == "fp16":
        return torch.float16, torch.amp.GradScaler(device.type)
    return torch.bfloat16, None


APPROX_PARAMS = {"resnet50": 24e6, "vgg19": 140e6, "vgg19_bn": 140e6}


def checkpoint_bytes(arch: str) -> int:
    # fp32 weights + optimizer state, in last.pt, last.prev.pt and best.pt, with headroom.
    return int(APPROX_PARAMS[arch] * 4 * 8)


@dataclass
class Run:
    """The pieces of one training run, built once."""

    cfg: Config
    env: DistEnv
    meta: DatasetMeta
    run_dir: Path
    log: RunLog
    device: torch.device
    raw_model: nn.Module
    trainer: Trainer
    plan: StepPlan
    train_input: Any
    eval_inputs: dict[str, Any]
    stop: StopRequest
    wandb_run_id: str | None = None
    last_eval: dict[str, Any] | None = None  # split -> metrics of the latest evaluation


def build_model_for(cfg: Config, meta: DatasetMeta, env: DistEnv, device: torch.device, log: RunLog) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    m = cfg.model
    kw = {"zero_init_residual": m.zero_init_residual} if m.name == "resnet50" else {"dropout": m.dropout}
    model = build_model(m.name, meta.num_classes, **kw)
    if env.distributed and cfg.model.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.info("CPU run: SyncBatchNorm is off (PyTorch supports it on GPU modules only); "
                     "each rank normalizes with its own batch statistics")
    model = model.to(device)
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: nn.Module, cfg: Config, env: DistEnv, device: torch.device) -> nn.Module:
    if not env.distributed:
        return model
    d = cfg.dist
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=d.bucket_cap_mb, gradient_as_bucket_view=d.gradient_as_bucket_view,
        static_graph=d.static_graph,
    )
    if d.comm_hook == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def configure_backends(cfg: Config, device: torch.device) -> None:
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_run(cfg: Config, env: DistEnv, meta: DatasetMeta, run_dir: Path, log: RunLog, device: torch.device) -> Run:
    configure_backends(cfg, device)
    plan = StepPlan.make(cfg.train.batch_size, env.world_size, cfg.train.micro_batch_size)
    raw = build_model_for(cfg, meta, env, device, log)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    model = wrap_ddp(raw, cfg, env, device)
    if cfg.model.compile:
        model = torch.compile(model)
    mixup = build_mixup(cfg.data.mixup, cfg.data.cutmix, cfg.optim.label_smoothing, meta.num_classes)
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    train_input = build_train_input(cfg, meta, plan, env.rank, device)
    steps = train_input.steps_per_epoch
    if steps == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the train split "
                          f"({len(meta.splits['train'].paths)} images): no full batch per epoch")
    schedule = Schedule(steps * cfg.train.epochs, round(cfg.optim.warmup_epochs * steps), cfg.optim.lr, cfg.optim.min_lr)
    trainer = Trainer(
        model=model, optimizer=build_optimizer(raw, cfg.optim), scaler=scaler, schedule=schedule,
        criterion=criterion, device=device, amp_dtype=amp_dtype, accum_steps=plan.accum_steps,
        clip_grad_norm=cfg.optim.clip_grad_norm, mixup=mixup,
        ema=ModelEma(raw, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None,
        channels_last=device.type == "cuda" and cfg.model.channels_last,
    )
    eval_bs = cfg.train.eval_batch_size or plan.micro_batch
    eval_inputs = {s: build_eval_input(cfg, meta, s, env.rank, env.world_size, eval_bs, device)
                   for s in cfg.train.eval_splits}
    return Run(cfg, env, meta, run_dir, log, device, raw, trainer, plan, train_input, eval_inputs, StopRequest())


# --- checkpoints -----------------------------------------------------------------------------------

def _identity(run: Run, state: TrainState) -> dict[str, Any]:
    """What every checkpoint carries to be loaded safely elsewhere (evaluate, predict, resume)."""
    return {
        "arch": run.cfg.model.name, "num_classes": run.meta.num_classes,
        "class_names": list(run.meta.class_names), "config": to_dict(run.cfg),
        "epoch": state.epoch, "global_step": state.global_step, "wandb_run_id": run.wandb_run_id,
    }


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Collective: every rank contributes its RNG state; rank 0 writes."""
    rngs = distributed.all_gather_objects(ckpt.rng_state())
    sums = {k: distributed.all_reduce_sum(v.clone()).cpu() for k, v in state.sums.items()}
    if not run.env.is_main:
        return
    t = run.trainer
    payload = _identity(run, state) | {
        "model": run.raw_model.state_dict(), "optimizer": t.optimizer.state_dict(),
        "scheduler": {"global_step": state.global_step, "total_steps": t.schedule.total_steps},
        "scaler": t.scaler.state_dict() if t.scaler else None,
        "ema": t.ema.state_dict() if t.ema else None,
        "step_in_epoch": state.step_in_epoch, "best_top1": state.best_top1, "epoch_sums": sums,
        "rng": rngs, "world_size": run.env.world_size,
    }
    ckpt.save_atomic(payload, run.run_dir / ckpt.LAST, keep_previous=True)


def save_best(run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
    if not run.env.is_main:
        return
    t = run.trainer
    payload = _identity(run, state) | {
        "model": (t.ema.module if t.ema else run.raw_model).state_dict(), "metrics": metrics,
    }
    ckpt.save_atomic(payload, run.run_dir / ckpt.BEST)


def restore(run: Run, saved: dict[str, Any], source: Path) -> TrainState:
    ckpt.check_compatible(saved, source, run.cfg.model.name, run.meta.num_classes)
    ckpt.check_resumable(saved, source)
    t = run.trainer
    run.raw_model.load_state_dict(saved["model"])
    t.optimizer.load_state_dict(saved["optimizer"])
    if t.scaler and saved["scaler"]:
        t.scaler.load_state_dict(saved["scaler"])
    if t.ema and saved["ema"]:
        t.ema.load_state_dict(saved["ema"])
    state = TrainState(saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["best_top1"],
                       new_sums(run.device))
    if run.env.is_main:  # the epoch's totals so far, counted once
        state.sums = {k: v.to(run.device) for k, v in saved["epoch_sums"].items()}
    if saved["world_size"] == run.env.world_size:
        ckpt.set_rng_state(saved["rng"][run.env.rank])
    else:
        run.log.info(f"resuming a {saved['world_size']}-process run on {run.env.world_size}: global batch "
                     f"{run.plan.batch_size} kept with {run.plan.accum_steps} micro-step(s) per step; "
                     "random streams re-seeded")
        seed_all(run.cfg.train.seed, run.env.rank, state.epoch, state.step_in_epoch)
    run.wandb_run_id = saved.get("wandb_run_id")
    return state


def load_start_state(run: Run) -> TrainState:
    resume = run.cfg.run.resume
    found = None
    if resume == "auto":
        found = ckpt.load_resumable(run.run_dir, run.log.warn)
    elif resume != "never":
        found = ckpt.load(resume), Path(resume)
    if found is None:
        return TrainState(sums=new_sums(run.device))
    state = restore(run, *found)
    run.log.info(f"resumed from {found[1]}: "
                 f"epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch, global step {state.global_step}")
    return state


# --- the loop --------------------------------------------------------------------------------------

@dataclass
class JobBudget:
    """run.stop_after_*: how much of the schedule this job runs before it checkpoints and exits."""

    start_step: int
    start_epoch: int
    max_steps: int
    max_epochs: int

    def steps_done(self, state: TrainState) -> bool:
        return self.max_steps > 0 and state.global_step - self.start_step >= self.max_steps

    def epochs_done(self, state: TrainState) -> bool:
        return self.max_epochs > 0 and state.epoch - self.start_epoch >= self.max_epochs


def epoch_hooks(run: Run, state: TrainState, budget: JobBudget) -> StepHooks:
    cfg, steps = run.cfg, run.train_input.steps_per_epoch
    total = steps * cfg.train.epochs

    def on_log(st: TrainState, rates: dict[str, float]) -> None:
        s = st.sums
        count = s["count"].clamp(min=1)
        loss, top1 = (s["loss"] / count).item(), (s["correct"] / count).item()  # this epoch so far, rank 0's share
        record = {"train/loss": loss, "train/top1": top1, "lr": rates["lr"],
                  "img_per_s": rates["img_per_s"] * run.env.world_size, "data_wait": rates["data_wait"],
                  "epoch": st.epoch}
        # data_wait: the share of wall time this rank waited for its next batch (the input path's cost).
        fields = {"loss": loss, "acc": f"{top1:.1%}", "img/s": record["img_per_s"], "lr": rates["lr"],
                  "data": f"{rates['data_wait']:.0%}"}
        if run.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
            fields["mem"] = f"{record['gpu_mem_gb']:.1f}G"
        run.log.step(record, st.global_step)
        eta = (total - st.global_step) * run.plan.batch_size / max(record["img_per_s"], 1e-9)
        run.log.progress(st.epoch, cfg.train.epochs, st.step_in_epoch, steps, eta, fields)

    def on_step(st: TrainState) -> None:
        every = cfg.train.checkpoint_every_steps
        if every and st.global_step % every == 0 and st.step_in_epoch < steps:
            save_checkpoint(run, st)

    def should_stop(st: TrainState, at_log: bool) -> bool:
        if budget.steps_done(st):
            return True  # the same step on every rank: no need to agree
        # Under DDP every rank must stop at the same step: agree at log points (a host sync).
        if run.env.distributed:
            return at_log and distributed.any_rank(run.stop.requested, run.device)
        return run.stop.requested

    return StepHooks(cfg.train.log_every, on_log, should_stop, on_step)


def finish_epoch(run: Run, state: TrainState, epoch_s: float, images_before: int) -> None:
    """images_before: images of this epoch counted before this job (restored from a checkpoint)."""
    sums = {k: distributed.all_reduce_sum(v.clone()) for k, v in state.sums.items()}
    count = max(int(sums["count"].item()), 1)
    record: dict[str, Any] = {
        "epoch": state.epoch, "step": state.global_step,
        "train_loss": sums["loss"].item() / count, "train_top1": sums["correct"].item() / count,
        "train_top5": sums["correct5"].item() / count,
        "lr": run.trainer.optimizer.param_groups[0]["lr"], "epoch_s": epoch_s,
        "img_per_s": (count - images_before) / max(epoch_s, 1e-9),
    }
    eval_model = run.trainer.ema.module if run.trainer.ema else run.trainer.model
    metrics = {}
    for split, eval_input in run.eval_inputs.items():
        m = evaluate(eval_model, eval_input.batches(), run.meta.num_classes, run.device,
                     run.trainer.amp_dtype, run.trainer.channels_last)
        metrics[split] = m
        record.update({f"{split}_loss": m["loss"], f"{split}_top1": m["top1"], f"{split}_top5": m["top5"]})
    run.last_eval = metrics
    record["time"] = time.time()
    key = "valid" if "valid" in metrics else next(iter(metrics), None)
    is_best = key is not None and metrics[key]["top1"] > state.best_top1
    if is_best:
        state.best_top1 = metrics[key]["top1"]
    run.log.epoch(record, state.global_step)
    run.log.info(_epoch_line(record, run.cfg.train.epochs))
    state.epoch += 1
    state.step_in_epoch = 0
    state.sums = new_sums(run.device)
    if is_best:
        save_best(run, state, {k: v for k, v in record.items()})
    save_checkpoint(run, state)


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch'] + 1}/{epochs}", f"train loss {r['train_loss']:.4f} acc {r['train_top1']:.2%}"]
    for split in ("valid", "test"):
        if f"{split}_top5" in r:
            parts.append(f"{split} top1 {r[f'{split}_top1']:.2%} top5 {r[f'{split}_top5']:.2%}")
    parts.append(f"{r['epoch_s']:.1f}s {r['img_per_s']:.0f} img/s")
    return " | ".join(parts)


def train_loop(run: Run, state: TrainState) -> bool:
    """Returns False when stopped by a signal (checkpoint written)."""
    cfg = run.cfg
    budget = JobBudget(state.global_step, state.epoch, cfg.run.stop_after_steps, cfg.run.stop_after_epochs)
    hooks = epoch_hooks(run, state, budget)
    while state.epoch < cfg.train.epochs:
        if state.step_in_epoch == 0:
            seed_all(cfg.train.seed, run.env.rank, state.epoch)
        t0 = time.perf_counter()
        images_before = int(distributed.all_reduce_sum(state.sums["count"].clone()).item())
        batches = run.train_input.batches(state.epoch, state.step_in_epoch)
        if not train_one_epoch(run.trainer, state, batches, hooks):
            save_checkpoint(run, state)
            why = "run.stop_after_steps" if budget.steps_done(state) else (run.stop.signal_name or "a signal on another rank")
            run.log.info(f"stopped by {why}: checkpoint at epoch {state.epoch + 1} step {state.step_in_epoch} "
                         f"written to {run.run_dir / ckpt.LAST}; run again with run.resume=auto to continue")
            return False
        finish_epoch(run, state, time.perf_counter() - t0, images_before)
        if state.epoch < cfg.train.epochs and (budget.epochs_done(state) or distributed.any_rank(run.stop.requested, run.device)):
            why = "run.stop_after_epochs" if budget.epochs_done(state) else run.stop.signal_name or "a signal on another rank"
            run.log.info(f"stopped by {why} after epoch {state.epoch}; checkpoint written to {run.run_dir / ckpt.LAST}")
            return False
    return True


def open_wandb(run: Run, state: TrainState) -> None:
    """Rank 0 only. wandb is imported lazily: training without logging must not need it installed."""
    from bfly.env import wandb_mode_override

    mode = wandb_mode_override() or run.cfg.wandb.mode  # WANDB_MODE wins, as in wandb itself
    if mode == "disabled" or state.epoch >= run.cfg.train.epochs:  # finished: nothing to log
        return
    try:
        from bfly.wandb_log import WandbSink
    except ImportError as e:
        if mode != "auto":
            raise ConfigError(f"wandb.mode={mode} but wandb cannot be imported ({e}); pip install wandb") from None
        run.log.warn("wandb is not installed: logging to metrics.jsonl only (wandb.mode=disabled silences this)")
        return
    sink = WandbSink.open(run, state)
    run.wandb_run_id = sink.run_id
    run.log.sinks.append(sink)


# --- entry -----------------------------------------------------------------------------------------

def prepare_run_dir(cfg: Config, env: DistEnv, run_dir: Path) -> None:
    """Before any process-group work: a full disk or a read-only directory fails now, not after an epoch."""
    if env.is_main:
        ckpt.ensure_writable(run_dir, checkpoint_bytes(cfg.model.name))
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))


def train(cfg: Config) -> int:
    env = dist_env()
    meta = load_metadata(cfg.data.root, splits=sorted({"train", *cfg.train.eval_splits}))
    run_dir = run_dir_of(cfg)
    device = distributed.pick_device(env)
    prepare_run_dir(cfg, env, run_dir)
    distributed.init(env, device, cfg.dist.backend, cfg.dist.timeout_s)
    log = RunLog(run_dir, env.is_main)
    try:
        run = build_run(cfg, env, meta, run_dir, log, device)
        state = load_start_state(run)
        if env.is_main:
            truncate_metrics(run_dir, state.epoch)
            open_wandb(run, state)
        return _train_and_report(run, state)
    finally:
        log.close()


def _train_and_report(run: Run, state: TrainState) -> int:
    cfg, env = run.cfg, run.env
    if state.epoch >= cfg.train.epochs:
        run.log.info(f"run in {run.run_dir} already finished {cfg.train.epochs} epochs (best valid top1 "
                     f"{state.best_top1:.2%}); pick another run.dir or raise train.epochs to train more")
        return 0
    run.log.info(
        f"bfly: {cfg.model.name}, {run.meta.num_classes} classes, {len(run.meta.splits['train'].paths)} train "
        f"images ({run.meta.layout} layout), {env.world_size} process(es) on {run.device.type}, global batch "
        f"{run.plan.batch_size} = {env.world_size} x {run.plan.accum_steps} x {run.plan.micro_batch}, "
        f"{run.train_input.steps_per_epoch} steps/epoch, run dir {run.run_dir}")
    run.stop.install()
    try:
        finished = train_loop(run, state)
    finally:
        run.stop.uninstall()
    if finished:
        run.log.info(f"done: best valid top1 {state.best_top1:.2%}; checkpoints in {run.run_dir}")
    for sink in run.log.sinks:
        sink.finish(run, finished)
    return 0


def _one_line(e: BaseException) -> str:
    # DataLoader re-raises worker exceptions with the worker's traceback in the message: keep the cause.
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.split("Error: ", 1)[1] if last.startswith(("bfly.", "DataError")) and "Error: " in last else last


def _rank_tag(env: DistEnv) -> str:
    return f" [rank {env.rank}]" if env.distributed else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        from bfly.preflight import preflight

        return preflight(args.config, args.overrides, args.nproc)
    env = dist_env()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        return train(cfg)
    except USER_ERRORS + (ValueError,) as e:
        # Start-up errors are the same on every rank: rank 0 reports them. Errors met while training
        # (a bad image) are reported by the rank that met them.
        if env.is_main or distributed.active():
            print(f"bfly.train: error{_rank_tag(env)}: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not distributed.active():
            raise
        # A collective failed: almost always another rank died first and printed its own error.
        print(f"bfly.train{_rank_tag(env)}: stopping, a collective failed ({_one_line(e)[:200]}); "
              "the failing rank's error is printed above", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
