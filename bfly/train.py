"""Train our VGG19 / ResNet50 on the butterfly data, on one process or many.

    python -m bfly.train --config configs/demo_cpu.yaml                     # one process
    torchrun --nproc_per_node=2 -m bfly.train --config configs/demo_cpu.yaml
    torchrun --nproc_per_node=4 -m bfly.train --config configs/resnet50.yaml train.epochs=60
    python -m bfly.train --help                                             # every config key

A run directory (run.dir) holds config.yaml, metrics.jsonl, train.log, last.pt and best.pt.
With run.resume=auto (the default) a run restarted on the same directory continues where its
last checkpoint left off, mid-epoch included. SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (to a trainer, to
torchrun's agent or to the whole process group) stop the run with a checkpoint at the current step.

Exit status: 0 finished (or a run.stop_after_* budget reached), 75 stopped by a signal with the
checkpoint written (run.stopped_exit_code; run again to resume), 2 a user error (config, data, run
directory, checkpoint: one line names the culprit), 1 anything else (a crash, a failed collective).
"""
from __future__ import annotations

import argparse
import random
import signal
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
from bfly.config import (Config, ConfigError, DistConfig, changed_keys, dump_yaml, flat, help_text, load_config,
                         run_dir_of, to_dict)
from bfly.data.inputs import build_eval_input, build_train_input, shm_free, shm_warning
from bfly.data.metadata import DataError, DatasetMeta, load_metadata
from bfly.data.sampling import StepPlan
from bfly.data.transforms import build_mixup
from bfly.engine import Schedule, StepHooks, Trainer, TrainState, device_clock, evaluate, new_sums, train_one_epoch
from bfly.ema import ModelEma
from bfly.env import DistEnv, dist_env, slurm_job_id
from bfly.models import build_model
from bfly.optim import build_optimizer
from bfly.rundir import RunDirBusy, RunDirLock, append_history, this_process
from bfly.runlog import RunLog
from bfly.stopping import STOP_SIGNALS, StopRequest, stop_when_parent_dies

USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError, RunDirBusy)


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
    args = parser.parse_intermixed_args(argv)  # overrides before or after --config
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
    writer: ckpt.CheckpointWriter
    wandb_run_id: str | None = None
    last_eval: dict[str, Any] | None = None  # split -> metrics of the latest evaluation
    config_written: bool = False  # config.yaml describes this job's config (rank 0)
    stall_s: float = 0.0  # seconds training waited for checkpoints since the last epoch record


def build_model_for(cfg: Config, meta: DatasetMeta, env: DistEnv, device: torch.device, log: RunLog) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    m = cfg.model
    kw = {"zero_init_residual": m.zero_init_residual} if m.name == "resnet50" else {"dropout": m.dropout}
    model = build_model(m.name, meta.num_classes, **kw)
    if env.distributed and cfg.model.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if note := compile_sync_bn_warning(cfg.model.compile, sync_bn=True):
                log.warn(note)
        else:
            log.info("CPU run: SyncBatchNorm is off (PyTorch supports it on GPU modules only); "
                     "each rank normalizes with its own batch statistics")
    model = model.to(device)
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_sync_bn_warning(compile: bool, sync_bn: bool) -> str | None:
    """model.compile with SyncBatchNorm compiles, but into many small graphs: say what it costs."""
    if not (compile and sync_bn):
        return None
    return ("model.compile=true with SyncBatchNorm: each SyncBN layer breaks the compiled graph "
            "(pytorch#161302; ResNet50 becomes ~53 graphs), so compiling gains little. model.sync_bn=false "
            "keeps per-GPU BatchNorm, which compiles into one graph; at 32 or more images per GPU its "
            "effect on accuracy is small")


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
            f"dist.static_graph=false, or train.micro_batch_size={plan.batch_size // plan.world_size}")


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


def build_run(cfg: Config, env: DistEnv, meta: DatasetMeta, run_dir: Path, log: RunLog, device: torch.device,
              stop: StopRequest) -> Run:
    configure_backends(cfg, device)
    plan = StepPlan.make(cfg.train.batch_size, env.world_size, cfg.train.micro_batch_size)
    check_ddp_plan(cfg.dist, plan)
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
    if note := shm_warning(cfg, plan, eval_bs, env.local_world_size, shm_free()):  # rank 0's node stands for all
        log.warn(note)
    eval_inputs = {s: build_eval_input(cfg, meta, s, env.rank, env.world_size, eval_bs, device)
                   for s in cfg.train.eval_splits}
    return Run(cfg, env, meta, run_dir, log, device, raw, trainer, plan, train_input, eval_inputs, stop,
               ckpt.CheckpointWriter(cfg.train.checkpoint_async))


# --- checkpoints -----------------------------------------------------------------------------------

def _identity(run: Run, state: TrainState) -> dict[str, Any]:
    """What every checkpoint carries to be loaded safely elsewhere (evaluate, predict, resume)."""
    return {
        "arch": run.cfg.model.name, "num_classes": run.meta.num_classes,
        "class_names": list(run.meta.class_names), "train_images": len(run.meta.splits["train"].paths),
        "config": to_dict(run.cfg), "epoch": state.epoch, "global_step": state.global_step,
        "wandb_run_id": run.wandb_run_id,
    }


def save_checkpoint(run: Run, state: TrainState, best_metrics: dict[str, Any] | None = None) -> None:
    """Collective: every rank contributes its RNG state; rank 0 copies the state to host memory and hands
    the files to the background writer (best.pt first when `best_metrics` is given, then last.pt)."""
    t0 = time.perf_counter()
    rngs = distributed.all_gather_objects(ckpt.rng_state())
    sums = {k: distributed.all_reduce_sum(v.clone()).cpu() for k, v in state.sums.items()}
    if run.env.is_main:
        t = run.trainer
        identity = _identity(run, state)
        writes = []
        if best_metrics is not None:
            best = identity | {"model": (t.ema.module if t.ema else run.raw_model).state_dict(),
                               "metrics": best_metrics}
            writes.append(ckpt.Write(ckpt.to_host(best), run.run_dir / ckpt.BEST, step=state.global_step))
        last = identity | {
            "model": run.raw_model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": {"global_step": state.global_step, "total_steps": t.schedule.total_steps},
            "scaler": t.scaler.state_dict() if t.scaler else None,
            "ema": t.ema.state_dict() if t.ema else None,
            "step_in_epoch": state.step_in_epoch, "best_top1": state.best_top1, "epoch_sums": sums,
            "rng": rngs, "world_size": run.env.world_size,
        }
        writes.append(ckpt.Write(ckpt.to_host(last), run.run_dir / ckpt.LAST, keep_previous=True,
                                 step=state.global_step))
        run.writer.submit(writes)
        if not run.config_written:  # config.yaml changes with the first checkpoint of this job
            write_config(run)
    run.stall_s += time.perf_counter() - t0


def write_config(run: Run) -> None:
    path = run.run_dir / "config.yaml"
    text = dump_yaml(run.cfg)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    run.config_written = True


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
        before = StepPlan.make(run.plan.batch_size, saved["world_size"],
                               saved.get("config", {}).get("train", {}).get("micro_batch_size", 0))
        now = run.plan.micro_batch
        synced = run.device.type == "cuda" and run.cfg.model.sync_bn and run.env.distributed
        bn = (f"BatchNorm batches stay {now} images per forward pass" if before.micro_batch == now else
              f"changes: BatchNorm statistics come from {now} images per forward pass (were {before.micro_batch})"
              + (", synchronised across processes (SyncBN)" if synced else ""))
        run.log.info(
            f"resuming a {saved['world_size']}-process run on {run.env.world_size}: global batch "
            f"{run.plan.batch_size} kept with {run.plan.accum_steps} micro-step(s) per step; exact: which images "
            f"each step sees, their augmentation, the LR schedule; {bn}; dropout and mixup random streams are "
            "re-seeded")
        seed_all(run.cfg.train.seed, run.env.rank, state.epoch, state.step_in_epoch)
    run.wandb_run_id = saved.get("wandb_run_id")
    return state


def resume_changes(cfg: Config, meta: DatasetMeta, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys whose change alters the optimisation or the data, between the checkpoint and this run."""
    old, new = flat(saved.get("config", {})), flat(to_dict(cfg))
    changes = changed_keys(old, new)
    names = list(meta.class_names)
    if "class_names" in saved and list(saved["class_names"]) != names:
        before = list(saved["class_names"])
        first = next((i for i, (a, b) in enumerate(zip(before, names)) if a != b), min(len(before), len(names)))
        changes.append((f"data.class_names[{first}]", before[first] if first < len(before) else None,
                        names[first] if first < len(names) else None))
    images = len(meta.splits["train"].paths)
    if "train_images" in saved and saved["train_images"] != images:
        changes.append(("data.train_images", saved["train_images"], images))
    return changes


def _key_of(change: tuple[str, Any, Any]) -> str:
    return change[0].split("[", 1)[0]


def _show(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


def check_edited_config(cfg: Config, run_dir: Path, saved: dict[str, Any]) -> None:
    """The run directory's config.yaml describes its checkpoints; an edit of it is not read by bfly and
    would be overwritten: say so instead of discarding it."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        import yaml

        on_disk = flat(yaml.safe_load(path.read_text()) or {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it ({e}); restore it or remove it") from None
    edits = changed_keys(flat(saved.get("config", {})), on_disk)
    if edits and changed_keys(on_disk, flat(to_dict(cfg))):
        raise ConfigError(
            f"{path} was edited after its checkpoint ({_show(edits)}) and this run was started with other "
            f"settings; bfly does not read that file: start with --config {path} to use the edit "
            f"(with run.allow_changes=[{','.join(k for k, _, _ in edits)}]) or undo it")


def check_resume(cfg: Config, meta: DatasetMeta, run_dir: Path, saved: dict[str, Any],
                 source: Path) -> list[tuple[str, Any, Any]]:
    """Refuses a resume that would silently change the optimisation or the data; returns the allowed changes.
    Also used by the preflight (bfly.preflight)."""
    check_edited_config(cfg, run_dir, saved)
    changes = resume_changes(cfg, meta, saved)
    refused = [c for c in changes if _key_of(c) not in cfg.run.allow_changes]
    if refused:
        keys = ",".join(dict.fromkeys(_key_of(c) for c in refused))
        raise ConfigError(
            f"resuming {source} with a different config: {_show(refused)}; these change the optimisation or the "
            f"data: undo them, start a new run.dir, or allow them with run.allow_changes=[{keys}]")
    return changes


def load_start_state(run: Run) -> tuple[TrainState, list[tuple[str, Any, Any]]]:
    """The state to start from and the config changes allowed on this resume (checked: refusals raise)."""
    resume = run.cfg.run.resume
    found = None
    if resume == "auto":
        found = ckpt.load_resumable(run.run_dir, run.log.warn)
    elif resume != "never":
        found = ckpt.load(resume), Path(resume)
    if found is None:
        return TrainState(sums=new_sums(run.device)), []
    saved, source = found
    ckpt.check_compatible(saved, source, run.cfg.model.name, run.meta.num_classes)
    ckpt.check_resumable(saved, source)
    changes = check_resume(run.cfg, run.meta, run.run_dir, saved, source)
    state = restore(run, saved, source)
    run.writer.intact[ckpt.LAST] = state.global_step
    run.log.info(f"resumed from {source}: "
                 f"epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch, global step {state.global_step}")
    return state, changes


def record_changes(run: Run, state: TrainState, changes: list[tuple[str, Any, Any]]) -> None:
    """Rank 0, after start-up: an allowed change is logged, kept in config_history.jsonl and sent to wandb."""
    if not changes or not run.env.is_main:
        return
    run.log.info(f"config changed on resume at global step {state.global_step} (run.allow_changes): {_show(changes)}")
    append_history(run.run_dir, {"time": time.time(), "global_step": state.global_step, "epoch": state.epoch,
                                 "changes": {k: {"old": a, "new": b} for k, a, b in changes}})
    for sink in run.log.sinks:
        sink.log_config_change({k: {"old": a, "new": b} for k, a, b in changes}, state.global_step)


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


def finish_epoch(run: Run, state: TrainState, epoch_s: float, images_before: int) -> bool:
    """images_before: images of this epoch counted before this job (restored from a checkpoint).
    Returns whether last.pt was written (train.checkpoint_every_epochs)."""
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
    state.epoch += 1
    state.step_in_epoch = 0
    state.sums = new_sums(run.device)
    last_due = state.epoch % run.cfg.train.checkpoint_every_epochs == 0 or state.epoch >= run.cfg.train.epochs
    # The stall of the checkpoints of this epoch: step checkpoints so far, plus the epoch's own.
    if last_due:
        save_checkpoint(run, state, dict(record) if is_best else None)
    elif is_best:
        save_best_only(run, state, dict(record))
    record["ckpt_stall_s"], run.stall_s = run.stall_s, 0.0
    run.log.epoch(record, state.global_step)
    run.log.info(_epoch_line(record, run.cfg.train.epochs))
    return last_due


def save_best_only(run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    if run.env.is_main:
        t = run.trainer
        best = _identity(run, state) | {"model": (t.ema.module if t.ema else run.raw_model).state_dict(),
                                        "metrics": metrics}
        run.writer.submit([ckpt.Write(ckpt.to_host(best), run.run_dir / ckpt.BEST, step=state.global_step)])
    run.stall_s += time.perf_counter() - t0


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch'] + 1}/{epochs}", f"train loss {r['train_loss']:.4f} acc {r['train_top1']:.2%}"]
    for split in ("valid", "test"):
        if f"{split}_top5" in r:
            parts.append(f"{split} top1 {r[f'{split}_top1']:.2%} top5 {r[f'{split}_top5']:.2%}")
    parts.append(f"{r['epoch_s']:.1f}s {r['img_per_s']:.0f} img/s")
    parts.append(f"ckpt stall {r['ckpt_stall_s']:.2f}s")
    return " | ".join(parts)


@dataclass(frozen=True)
class Outcome:
    """How a training job ended. `stopped_by`: None (the schedule is complete), a signal name, or the
    run.stop_after_* key whose budget ended this job."""

    stopped_by: str | None = None
    checkpoint: Path | None = None  # where the state at the stop was written
    signals: tuple[str, ...] = ()  # every stop signal this process received (submitit requeues on its own)

    @property
    def finished(self) -> bool:
        return self.stopped_by is None

    @property
    def by_signal(self) -> bool:
        """Stopped by a signal to this process or to another rank (not by a run.stop_after_* budget)."""
        return self.stopped_by is not None and not self.stopped_by.startswith("run.stop_after_")


def _stopped(run: Run, state: TrainState, why: str) -> Outcome:
    """Every rank: the checkpoint of `state` is written (waited for); one line per rank says so."""
    run.writer.wait()
    last = run.run_dir / ckpt.LAST
    where = f"epoch {state.epoch + 1} step {state.step_in_epoch}" if state.step_in_epoch else f"the end of epoch {state.epoch}"
    if run.env.is_main:
        run.log.info(f"stopped by {why}: checkpoint at {where} written to {last}; run again "
                     "(run.resume=auto) to continue")
    else:
        print(f"[rank {run.env.rank}] stopped by {why}: checkpoint at {where} written to {last} by rank 0", flush=True)
    return Outcome(why, last, tuple(run.stop.caught))


def _stop_reason(run: Run, budget: JobBudget, state: TrainState) -> str:
    if run.stop.signal_name:
        return run.stop.signal_name
    if budget.steps_done(state):
        return "run.stop_after_steps"
    if budget.epochs_done(state):
        return "run.stop_after_epochs"
    return "a signal on another rank"


def train_loop(run: Run, state: TrainState) -> Outcome:
    cfg = run.cfg
    budget = JobBudget(state.global_step, state.epoch, cfg.run.stop_after_steps, cfg.run.stop_after_epochs)
    hooks = epoch_hooks(run, state, budget)
    while state.epoch < cfg.train.epochs:
        if state.step_in_epoch == 0:
            seed_all(cfg.train.seed, run.env.rank, state.epoch)
        t0 = device_clock(run.device)
        images_before = int(distributed.all_reduce_sum(state.sums["count"].clone()).item())
        batches = run.train_input.batches(state.epoch, state.step_in_epoch)
        if not train_one_epoch(run.trainer, state, batches, hooks):
            save_checkpoint(run, state)
            return _stopped(run, state, _stop_reason(run, budget, state))
        saved = finish_epoch(run, state, device_clock(run.device) - t0, images_before)
        if state.epoch < cfg.train.epochs and (budget.epochs_done(state) or distributed.any_rank(run.stop.requested, run.device)):
            if not saved:
                save_checkpoint(run, state)
            return _stopped(run, state, _stop_reason(run, budget, state))
    run.writer.wait()
    return Outcome()


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

class StartupRefused(Exception):
    """On ranks other than 0: rank 0 refused the start and prints why."""


def lock_run_dir(run_dir: Path, env: DistEnv) -> RunDirLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it got it."""
    lock, error = None, None
    if env.is_main:
        lock = RunDirLock(run_dir, this_process(slurm_job_id()))
        try:
            note = lock.acquire()
            if note:
                print(f"warning: {note}", flush=True)
        except RunDirBusy as e:
            lock, error = None, e
    refused = distributed.all_gather_objects(error is not None)[0]
    if error is not None:
        raise error
    if refused:
        raise StartupRefused()
    return lock


def checkpoint_sizes(run: Run) -> tuple[int, int]:
    """(last.pt, best.pt) bytes, from the model and the optimizer's per-parameter state."""
    model = ckpt.state_bytes(run.raw_model.state_dict())
    params = sum(p.numel() * p.element_size() for p in run.raw_model.parameters() if p.requires_grad)
    o = run.cfg.optim
    per_param = 2 if o.name == "adamw" else int(o.momentum > 0)
    ema = model if run.trainer.ema else 0
    return model + per_param * params + ema, model


def train(cfg: Config, env: DistEnv, stop: StopRequest) -> Outcome:
    meta = load_metadata(cfg.data.root, splits=sorted({"train", *cfg.train.eval_splits}))
    run_dir = run_dir_of(cfg)
    device = distributed.pick_device(env)
    if env.is_main:  # before any process-group work: an unwritable directory fails now, not after an epoch
        ckpt.ensure_writable(run_dir)
    distributed.init(env, device, cfg.dist.backend, cfg.dist.timeout_s)
    lock = lock_run_dir(run_dir, env)
    log = RunLog(run_dir, env.is_main)
    run = None
    try:
        run = build_run(cfg, env, meta, run_dir, log, device, stop)
        state, changes = load_start_state(run)
        if env.is_main:
            ckpt.ensure_space(run_dir, ckpt.space_needed(run_dir, *checkpoint_sizes(run)))
        if distributed.any_rank(stop.requested, device):
            log.info(f"stopped by {stop.signal_name or 'a signal on another rank'} during start-up: nothing "
                     f"trained, nothing written")
            return Outcome(stop.signal_name or "a signal on another rank", None, tuple(stop.caught))
        # Every start-up check passed: from here on the run directory changes.
        log.attach(state.epoch)
        if env.is_main and not (run_dir / "config.yaml").exists():
            write_config(run)
        if env.is_main:
            open_wandb(run, state)
        record_changes(run, state, changes)
        return _train_and_report(run, state)
    except (*USER_ERRORS, RuntimeError) as e:
        if log.attached:  # met after start-up: also in train.log
            log.to_file(f"error{_rank_tag(env)}: {_one_line(e)}")
        raise
    finally:
        if run is not None:
            try:
                run.writer.wait()
            except Exception as e:  # noqa: BLE001 - already failing; say what else went wrong
                print(f"bfly.train{_rank_tag(env)}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        if lock is not None:
            lock.release()
        log.close()


def _train_and_report(run: Run, state: TrainState) -> Outcome:
    cfg, env = run.cfg, run.env
    if state.epoch >= cfg.train.epochs:
        run.log.info(f"run in {run.run_dir} already finished {cfg.train.epochs} epochs (best valid top1 "
                     f"{state.best_top1:.2%}); pick another run.dir, or raise train.epochs with "
                     f"run.allow_changes=[train.epochs] to train more")
        return Outcome()
    run.log.info(
        f"bfly: {cfg.model.name}, {run.meta.num_classes} classes, {len(run.meta.splits['train'].paths)} train "
        f"images ({run.meta.layout} layout), {env.world_size} process(es) on {run.device.type}, global batch "
        f"{run.plan.batch_size} = {env.world_size} x {run.plan.accum_steps} x {run.plan.micro_batch}, "
        f"{run.train_input.steps_per_epoch} steps/epoch, run dir {run.run_dir}")
    outcome = train_loop(run, state)
    if outcome.finished:
        run.log.info(f"done: best valid top1 {state.best_top1:.2%}; checkpoints in {run.run_dir}")
    for sink in run.log.sinks:
        sink.finish(run, outcome.finished)
    return outcome


def _one_line(e: BaseException) -> str:
    # DataLoader re-raises worker exceptions with the worker's traceback in the message: keep the cause.
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.split("Error: ", 1)[1] if last.startswith(("bfly.", "DataError")) and "Error: " in last else last


def _rank_tag(env: DistEnv) -> str:
    return f" [rank {env.rank}]" if env.distributed else ""


@dataclass(frozen=True)
class Result:
    exit_code: int
    outcome: Outcome | None  # None: the job failed or only printed something


def run_job(argv: list[str] | None = None) -> Result:
    """The command: parse, train, map the outcome and the errors to an exit status (module docstring)."""
    args = parse_args(argv)
    if args.check:
        from bfly.preflight import preflight

        return Result(preflight(args.config, args.overrides, args.nproc), None)
    env = dist_env()
    # Before any start-up work, so that a stop signal at any time ends the job cleanly (no traceback).
    stop = StopRequest().install()
    if env.source == "torchrun":
        stop_when_parent_dies()  # the agent's death (kill -9) becomes a SIGTERM: checkpoint and exit
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return Result(0, None)
        outcome = train(cfg, env, stop)
        return Result(cfg.run.stopped_exit_code if outcome.by_signal else 0, outcome)
    except StartupRefused:
        return Result(2, None)
    except USER_ERRORS + (ValueError,) as e:
        # Start-up errors are the same on every rank: rank 0 reports them. Errors met while training
        # (a bad image) are reported by the rank that met them.
        if env.is_main or distributed.active():
            print(f"bfly.train: error{_rank_tag(env)}: {_one_line(e)}", file=sys.stderr, flush=True)
        return Result(2, None)
    except RuntimeError as e:
        if not distributed.active():
            raise
        # A collective failed: almost always another rank died first and printed its own error.
        print(f"bfly.train{_rank_tag(env)}: stopping, a collective failed ({_one_line(e)[:200]}); "
              "the failing rank's error is printed above", file=sys.stderr, flush=True)
        return Result(1, None)
    finally:
        distributed.shutdown()
        stop.uninstall()


def main(argv: list[str] | None = None) -> int:
    return run_job(argv).exit_code


def _command() -> int:
    code = main()
    # The outcome is decided and written: a signal that arrives while the process exits (torchrun's
    # SIGTERM to the other trainers once one has exited, say) must not turn it into a death by signal.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(_command())
