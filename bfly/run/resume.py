"""Starting a run from a checkpoint, and the checks that keep a resume from changing the run silently
(also run by the preflight); the space and config.yaml a run's checkpoints need. Saving them is
bfly.run.checkpoints'; what a checkpoint holds is bfly.core.checkpoint's (the format).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bfly.core import checkpoint as ckpt
from bfly.core.config import Config, ConfigError, changed_keys, dump_yaml, flat, to_dict
from bfly.core.data.metadata import DatasetMeta
from bfly.core.data.sampling import StepPlan
from bfly.core.engine import TrainState, new_sums
from bfly.core.stack import seed_all
from bfly.run.build import Run
from bfly.run.rundir import append_history

Change = tuple[str, Any, Any]  # (key, old, new)


def space_needed(run_dir: Path, cfg: Config, last_bytes: int, best_bytes: int) -> int:
    """Free bytes the run's checkpoints still need as train.keep_last_n and snapshot_every_epochs keep
    them (training's start-up check and the preflight ask the same)."""
    every = cfg.train.snapshot_every_epochs
    snapshots = cfg.train.epochs // every if every else 0
    return ckpt.space_needed(run_dir, last_bytes, best_bytes, cfg.train.keep_last_n, snapshots)


def write_config(run_dir: Path, cfg: Config) -> bool:
    """The run directory's config.yaml describes `cfg` (returns True, for `config_written`)."""
    path = run_dir / "config.yaml"
    text = dump_yaml(cfg)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return True


# --- starting from a checkpoint ----------------------------------------------------------------------


def load_start_state(run: Run, writer: ckpt.CheckpointWriter) -> tuple[TrainState, list[Change], str | None]:
    """The state to start from, the config changes allowed on this resume (checked: refusals raise) and
    the wandb run id the checkpoint carries."""
    found = ckpt.find_start(run.run_dir, run.cfg.run.resume, run.log.warn)
    if found is None:
        return TrainState(sums=new_sums(run.device)), [], None
    saved, source = found
    changes = check_resume(run.cfg, run.meta, run.run_dir, saved, source)
    state = restore(run, saved)
    if source.name == ckpt.LAST and source.parent.resolve() == run.run_dir.resolve():
        writer.intact[ckpt.LAST] = state.global_step
    run.log.info(
        f"resumed from {source}: "
        f"epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch, global step {state.global_step}"
    )
    return state, changes, saved.get("wandb_run_id")


def restore(run: Run, saved: dict[str, Any]) -> TrainState:
    """Loads a checked last.pt into the run's model, optimizer, scaler and EMA; returns its position."""
    t = run.trainer
    run.raw_model.load_state_dict(saved["model"])
    t.optimizer.load_state_dict(saved["optimizer"])
    if t.scaler and saved["scaler"]:
        t.scaler.load_state_dict(saved["scaler"])
    if t.ema and saved["ema"]:
        t.ema.load_state_dict(saved["ema"])
    state = TrainState(
        saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["best_top1"], new_sums(run.device)
    )
    if run.env.is_main:  # the epoch's totals so far, counted once
        state.sums = {k: v.to(run.device) for k, v in saved["epoch_sums"].items()}
    if saved["world_size"] == run.env.world_size:
        ckpt.set_rng_state(saved["rng"][run.env.rank])
    else:
        before = StepPlan.make(run.plan.batch_size, saved["world_size"], ckpt.saved_micro_batch_size(saved))
        now = run.plan.micro_batch
        synced = run.cfg.model.sync_bn and run.env.distributed
        bn = (
            f"BatchNorm batches stay {now} images per forward pass"
            if before.micro_batch == now
            else f"changes: BatchNorm statistics come from {now} images per forward pass (were {before.micro_batch})"
            + (", synchronised across processes (SyncBN)" if synced else "")
        )
        run.log.info(
            f"resuming a {saved['world_size']}-process run on {run.env.world_size}: global batch "
            f"{run.plan.batch_size} kept with {run.plan.accum_steps} micro-step(s) per step; exact: which images "
            f"each step sees, their augmentation, the LR schedule; {bn}; dropout and mixup random streams are "
            "re-seeded"
        )
        seed_all(run.cfg.train.seed, run.env.rank, state.epoch, state.step_in_epoch)
    return state


def record_changes(run: Run, state: TrainState, changes: list[Change]) -> None:
    """Rank 0, after start-up: an allowed change is logged, kept in config_history.jsonl and sent to wandb."""
    if not changes or not run.env.is_main:
        return
    run.log.info(f"config changed on resume at global step {state.global_step} (run.allow_changes): {show(changes)}")
    append_history(
        run.run_dir,
        {
            "time": time.time(),
            "global_step": state.global_step,
            "epoch": state.epoch,
            "changes": {k: {"old": a, "new": b} for k, a, b in changes},
        },
    )
    for sink in run.log.sinks:
        sink.log_config_change({k: {"old": a, "new": b} for k, a, b in changes}, state.global_step)


# --- the checks ---------------------------------------------------------------------------------------


def resume_changes(cfg: Config, meta: DatasetMeta, saved: dict[str, Any]) -> list[Change]:
    """Keys whose change alters the optimisation or the data, between the checkpoint and this run."""
    old, new = flat(saved.get("config", {})), flat(to_dict(cfg))
    changes = changed_keys(old, new)
    names = list(meta.class_names)
    if "class_names" in saved and list(saved["class_names"]) != names:
        before = list(saved["class_names"])
        first = next((i for i, (a, b) in enumerate(zip(before, names)) if a != b), min(len(before), len(names)))
        changes.append(
            (
                f"data.class_names[{first}]",
                before[first] if first < len(before) else None,
                names[first] if first < len(names) else None,
            )
        )
    images = len(meta.splits["train"].paths)
    if "train_images" in saved and saved["train_images"] != images:
        changes.append(("data.train_images", saved["train_images"], images))
    return changes


def _key_of(change: Change) -> str:
    return change[0].split("[", 1)[0]


def show(changes: list[Change]) -> str:
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
            f"{path} was edited after its checkpoint ({show(edits)}) and this run was started with other "
            f"settings; bfly does not read that file: start with --config {path} to use the edit "
            f"(with run.allow_changes=[{','.join(k for k, _, _ in edits)}]) or undo it"
        )


def check_resume(cfg: Config, meta: DatasetMeta, run_dir: Path, saved: dict[str, Any], source: Path) -> list[Change]:
    """Refuses a checkpoint this run cannot resume (another model or class count, weights only) or a resume
    that would silently change the optimisation or the data; returns the allowed changes. Also used by
    the preflight (bfly.preflight)."""
    ckpt.check_compatible(saved, source, cfg.model.name, meta.num_classes)
    ckpt.check_resumable(saved, source)
    check_edited_config(cfg, run_dir, saved)
    changes = resume_changes(cfg, meta, saved)
    refused = [c for c in changes if _key_of(c) not in cfg.run.allow_changes]
    if refused:
        keys = ",".join(dict.fromkeys(_key_of(c) for c in refused))
        raise ConfigError(
            f"resuming {source} with a different config: {show(refused)}; these change the optimisation or the "
            f"data: undo them, start a new run.dir, or allow them with run.allow_changes=[{keys}]"
        )
    return changes
