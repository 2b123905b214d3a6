"""One training run: its start-up (process group, run directory, the checkpoint to start from, start-up
checks), its loop with the components in their order, and the report at its end.

Whoever runs it (the bfly.train command's job) lends it what lies beyond a run through a `Harness`: the
heartbeat's phases, the record of the attempt, extra components. A run on its own needs none of them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from bfly.core import checkpoint as ckpt, distributed
from bfly.core.config import Config, run_dir_of
from bfly.core.data.metadata import load_metadata
from bfly.core.engine import TrainState
from bfly.core.env import DistEnv
from bfly.core.errors import one_line
from bfly.core.optim import implementation
from bfly.core.stack import pick_device
from bfly.core.stopping import StopRequest
from bfly.run.build import Run, build_run
from bfly.run.checkpoints import CheckpointSchedule, RunCheckpoints
from bfly.run.evaluation import Evaluation
from bfly.run.exchange import LogExchange
from bfly.run.health import RankHealth
from bfly.run.loop import Callback, Callbacks, train_loop
from bfly.run.metrics import EpochRecord, MetricsLog
from bfly.run.outcome import OTHER_RANK, Outcome
from bfly.run.phases import Phases
from bfly.run.profile import StepProfiler
from bfly.run.resume import load_start_state, record_changes, space_needed, write_config
from bfly.run.rundir import lock_run_dir
from bfly.run.runlog import RunLog, Sink, open_wandb
from bfly.run.seeding import EpochSeed
from bfly.run.stops import JobBudget, StopAgreement


class Recorded(Protocol):
    """What a harness's `recorded` block yields: the run sets its outcome before leaving the block."""

    outcome: Outcome | None


@dataclass
class _NotRecorded:
    outcome: Outcome | None = None


@contextlib.contextmanager
def _not_recorded(*_: Any) -> Iterator[Recorded]:
    yield _NotRecorded()


@dataclass
class Harness:
    """What the job around a run lends it."""

    phases: Phases = field(default_factory=Phases)  # the heartbeat: the run announces its phases to it
    components: list[Callback | None] = field(default_factory=list)  # called first in the loop (test faults)
    before_rendezvous: Callable[[Path, torch.device], None] = lambda run_dir, device: None
    before_write: Callable[[Path], None] | None = None  # the checkpoint writer's (bfly.core.checkpoint)
    restart_line: str | None = None  # why this start is a restart: for the log
    # Around the run from its start-up checks on: (run dir, env, device, state) -> a block that yields a Recorded.
    recorded: Callable[[Path, DistEnv, torch.device, TrainState], contextlib.AbstractContextManager[Recorded]] = (
        _not_recorded
    )
    sink_opened: Callable[[Sink], None] = lambda sink: None  # the dashboard's sink (wandb), once open
    error_line: Callable[[BaseException], str | None] = lambda e: None  # the train.log line of an error, if any


def rank_tag(env: DistEnv) -> str:
    return f" [rank {env.rank}]" if env.distributed else ""


def train(cfg: Config, env: DistEnv, stop: StopRequest, harness: Harness | None = None) -> Outcome:
    """Start-up, then the loop (bfly.run.loop) from the run's checkpoint, if any; returns how it ended."""
    harness = harness or Harness()
    meta = load_metadata(cfg.data.root, splits=sorted({"train", *cfg.train.eval_splits}))
    run_dir = run_dir_of(cfg)
    device = pick_device(env.local_rank, env.local_world_size)
    harness.before_rendezvous(run_dir, device)
    with harness.phases.during("rendezvous"):
        distributed.init(env, device, cfg.dist.backend, cfg.dist.timeout_s)
    # An unwritable directory fails now, not after an epoch. After the process group is up: the other
    # ranks, in their next collective, learn that rank 0 failed (before it, they would wait for it).
    if env.is_main:
        ckpt.ensure_writable(run_dir)
    lock = lock_run_dir(run_dir, env)
    log = RunLog(run_dir, env.is_main)
    writer = ckpt.CheckpointWriter(cfg.train.checkpoint_async, harness.before_write)
    try:
        return _start(build_run(cfg, env, meta, run_dir, log, device, stop), writer, harness)
    except Exception as e:
        if log.attached and (line := harness.error_line(e)):  # met after start-up: also in train.log
            log.to_file(line)
        raise
    finally:
        try:
            writer.wait()
        except Exception as e:
            print(f"bfly.train{rank_tag(env)}: error: {one_line(e)}", file=sys.stderr, flush=True)
        if lock is not None:
            lock.release()
        log.close()


def _start(run: Run, writer: ckpt.CheckpointWriter, harness: Harness) -> Outcome:
    """The start-up checks that need the run's pieces; then, the run directory changing from here on, the run."""
    cfg, env, log, run_dir = run.cfg, run.env, run.log, run.run_dir
    state, changes, wandb_id = load_start_state(run, writer)
    if env.is_main:
        sizes = ckpt.sizes(run.raw_model, cfg.optim.name, cfg.optim.momentum, run.trainer.ema is not None)
        ckpt.ensure_space(run_dir, space_needed(run_dir, cfg, *sizes))
    if distributed.any_rank(run.stop.requested, run.device):
        why = run.stop.signal_name or OTHER_RANK
        log.info(f"stopped by {why} during start-up: nothing trained, nothing written")
        return Outcome(why, None, tuple(run.stop.caught))
    # Every start-up check passed: from here on the run directory changes.
    log.attach(state.epoch)
    if harness.restart_line:
        log.info(harness.restart_line)
    if run.device.type == "cuda":  # where NCCL's flight recorder writes on a collective's timeout
        (run_dir / "hang").mkdir(exist_ok=True)
    config_written = env.is_main and not (run_dir / "config.yaml").exists() and write_config(run_dir, cfg)
    with harness.recorded(run_dir, env, run.device, state) as attempt:  # attempts.jsonl
        if env.is_main and state.epoch < cfg.train.epochs:  # finished: nothing to log
            sink = open_wandb(log, cfg.wandb.mode, lambda: _wandb_sink(run, wandb_id))
            wandb_id = sink.run_id if sink else wandb_id
            if sink:
                harness.sink_opened(sink)
        record_changes(run, state, changes)
        attempt.outcome = _train_and_report(run, RunCheckpoints(run, writer, wandb_id, config_written), state, harness)
        return attempt.outcome


def _wandb_sink(run: Run, resume_id: str | None):
    from bfly.run.wandb_log import WandbSink, job_info

    job = job_info(run.env.world_size, run.meta, run.device.type, run.run_dir)
    return WandbSink.open(run.cfg, run.run_dir, job, resume_id, run.log.warn)


def _train_and_report(run: Run, checkpoints: RunCheckpoints, state: TrainState, harness: Harness) -> Outcome:
    cfg, env = run.cfg, run.env
    if state.epoch >= cfg.train.epochs:
        run.log.info(
            f"run in {run.run_dir} already finished {cfg.train.epochs} epochs (best valid top1 "
            f"{state.best_top1:.2%}); pick another run.dir, or raise train.epochs with "
            f"run.allow_changes=[train.epochs] to train more"
        )
        return Outcome()
    run.log.info(
        f"bfly: {cfg.model.name}, {run.meta.num_classes} classes, {len(run.meta.splits['train'].paths)} train "
        f"images ({run.meta.layout} layout), {env.world_size} process(es) on {run.device.type}, global batch "
        f"{run.plan.batch_size} = {env.world_size} x {run.plan.accum_steps} x {run.plan.micro_batch}, "
        f"{run.train_input.steps_per_epoch} steps/epoch, run dir {run.run_dir}"
    )
    # Which optimizer kernel runs: the fused one on CUDA (no host sync in fp16's scaler step), foreach elsewhere.
    run.log.info(f"optimizer: {cfg.optim.name}, {implementation(cfg.optim.name, run.device)} implementation")
    return train_loop(run, state, Callbacks(components(run, checkpoints, state, harness)))


def components(run: Run, checkpoints: RunCheckpoints, state: TrainState, harness: Harness) -> list[Callback | None]:
    """The run's components, in the order the loop calls them (None: not in this run): the heartbeat wraps
    the batches the faults slowed; a log point's figures are read back (with the stop flag and health's
    rows) before the components use them; health adds to a log point before it is logged and to an epoch's record
    after the evaluation; the budget answers before the stop agreement's collective; checkpoints are saved
    before the profiler marks the step, and before the stop line and the epoch's record are written."""
    cfg, env, phases = run.cfg, run.env, harness.phases
    health = RankHealth.start(run.trainer.model, env, run.device, run.log.warn)
    agreement = StopAgreement(run.stop, env, run.device, phases)
    return [
        *harness.components,
        phases,
        EpochSeed(cfg.train.seed, env.rank),
        EpochRecord(run, phases),
        Evaluation(run, phases),
        LogExchange(env, run.device, phases, [agreement, health] if health else [agreement]),
        health,
        JobBudget(state.global_step, state.epoch, cfg.run.stop_after_steps, cfg.run.stop_after_epochs),
        agreement,
        CheckpointSchedule(run, checkpoints, phases),
        StepProfiler.for_run(cfg.train.profile_steps, run.run_dir, run.device, env.is_main, run.log.info),
        MetricsLog(run),
    ]
