"""A run's checkpoints: when they are written (`CheckpointSchedule`, a component of the run's loop) and how
(`RunCheckpoints`: a collective, every rank's RNG state; rank 0 hands the files to the background writer).
What a checkpoint holds is bfly.core.checkpoint's (the format).

When: every train.checkpoint_every_steps steps inside an epoch; at the end of every
train.checkpoint_every_epochs-th epoch, of the last epoch and of an epoch train.snapshot_every_epochs keeps
as epoch-<E>.pt; best.pt when an epoch's evaluation is the best so far; at a stop. The seconds training
waited for the checkpoints of an epoch go into its record (ckpt_stall_s).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bfly.core import checkpoint as ckpt, distributed
from bfly.core.config import to_dict
from bfly.core.engine import TrainState
from bfly.core.stack import evaluated_model
from bfly.run.build import Run
from bfly.run.loop import Callback, EpochEnd
from bfly.run.outcome import Outcome
from bfly.run.phases import Phases
from bfly.run.resume import write_config


class RunCheckpoints:
    """Writes a run's last.pt / best.pt (and config.yaml with the first checkpoint of a job), keeping what
    train.keep_last_n says (bfly.core.checkpoint: rolling, pruning). Each write returns the seconds training
    waited for it."""

    def __init__(self, run: Run, writer: ckpt.CheckpointWriter, wandb_run_id: str | None, config_written: bool):
        self.run, self.writer, self.wandb_run_id = run, writer, wandb_run_id
        self.config_written = config_written  # config.yaml describes this job's config (rank 0)
        self._saved_step = -1  # global step of the newest last.pt of this job
        self._staging = ckpt.HostStaging()  # one host buffer for every save of the run

    def save(self, state: TrainState, best_metrics: dict[str, Any] | None = None, snapshot: bool = False) -> float:
        """Collective: every rank contributes its RNG state; rank 0 copies the state to host memory and hands
        the files to the background writer (best.pt first when `best_metrics` is given, then last.pt, also
        kept as epoch-<E>.pt when `snapshot`). A step already saved (a stop right after a step checkpoint) is
        not written twice."""
        if best_metrics is None and state.global_step == self._saved_step:
            return 0.0  # the same on every rank: global_step is
        self._saved_step = state.global_step
        t0 = time.perf_counter()
        run, t = self.run, self.run.trainer
        rngs = distributed.all_gather_objects(ckpt.rng_state())
        sums = {k: distributed.all_reduce_sum(v.clone()).cpu() for k, v in state.sums.items()}
        if run.env.is_main:
            weights = run.raw_model.state_dict()
            last = ckpt.last_payload(
                self._identity(state),
                model=weights,
                optimizer=t.optimizer.state_dict(),
                total_steps=t.schedule.total_steps,
                scaler=t.scaler.state_dict() if t.scaler else None,
                ema=t.ema.state_dict() if t.ema else None,
                step_in_epoch=state.step_in_epoch,
                best_top1=state.best_top1,
                epoch_sums=sums,
                rng=rngs,
                world_size=run.env.world_size,
            )
            # Without an EMA best.pt's weights are last.pt's: the same tensors, copied to the host once.
            best = None if best_metrics is None else self._best_payload(state, best_metrics, weights)
            self.writer.wait()  # the staging buffer is free once the previous files are written
            best_host, last_host = self._staging.to_host((best, last))
            writes = (
                [] if best_host is None else [ckpt.Write(best_host, run.run_dir / ckpt.BEST, step=state.global_step)]
            )
            writes.append(
                ckpt.Write(
                    last_host,
                    run.run_dir / ckpt.LAST,
                    keep_previous=True,
                    step=state.global_step,
                    keep_last_n=run.cfg.train.keep_last_n,
                    snapshot=run.run_dir / ckpt.snapshot_name(state.epoch) if snapshot else None,
                )
            )
            self.writer.submit(writes)
            if not self.config_written:  # config.yaml changes with the first checkpoint of this job
                self.config_written = write_config(run.run_dir, run.cfg)
        return time.perf_counter() - t0

    def save_best(self, state: TrainState, metrics: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        if self.run.env.is_main:
            self.writer.submit([self._best(state, metrics)])
        return time.perf_counter() - t0

    def _identity(self, state: TrainState) -> dict[str, Any]:
        run = self.run
        return ckpt.identity(
            to_dict(run.cfg),
            list(run.meta.class_names),
            len(run.meta.splits["train"].paths),
            state.epoch,
            state.global_step,
            self.wandb_run_id,
        )

    def _best_payload(self, state: TrainState, metrics: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
        evaluated = evaluated_model(self.run.trainer)
        if evaluated is not self.run.raw_model:
            weights = evaluated.state_dict()
        return ckpt.best_payload(self._identity(state), weights, metrics)

    def _best(self, state: TrainState, metrics: dict[str, Any]) -> ckpt.Write:
        best = self._best_payload(state, metrics, self.run.raw_model.state_dict())
        self.writer.wait()  # the staging buffer is free once the previous files are written
        return ckpt.Write(self._staging.to_host(best), self.run.run_dir / ckpt.BEST, step=state.global_step)


class CheckpointSchedule(Callback):
    """When the run's checkpoints are written (module docstring), with the heartbeat in the phase of a
    checkpoint write while they are."""

    def __init__(self, run: Run, checkpoints: RunCheckpoints, phases: Phases):
        self.run, self.checkpoints, self.phases = run, checkpoints, phases
        self._stall_s = 0.0  # of the current epoch's checkpoints so far

    def snapshot_due(self, state: TrainState) -> bool:
        """At the end of an epoch that train.snapshot_every_epochs keeps as epoch-<E>.pt."""
        every = self.run.cfg.train.snapshot_every_epochs
        return every > 0 and state.step_in_epoch == 0 and state.epoch > 0 and state.epoch % every == 0

    def _save(self, state: TrainState, best_metrics: dict[str, Any] | None = None) -> None:
        self._stall_s += self.checkpoints.save(state, best_metrics, self.snapshot_due(state))

    def on_step(self, state: TrainState) -> None:
        every = self.run.cfg.train.checkpoint_every_steps
        if every and state.global_step % every == 0 and state.step_in_epoch < self.run.train_input.steps_per_epoch:
            with self.phases.saving(self.run.env.is_main):
                self._save(state)

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        train = self.run.cfg.train
        last_due = (
            state.epoch % train.checkpoint_every_epochs == 0 or state.epoch >= train.epochs or self.snapshot_due(state)
        )
        with self.phases.saving(self.run.env.is_main):
            if last_due:
                self._save(state, dict(end.record) if end.best else None)
            elif end.best:
                self._stall_s += self.checkpoints.save_best(state, dict(end.record))
        # The stall of the checkpoints of this epoch: step checkpoints so far, plus the epoch's own.
        end.record["ckpt_stall_s"], self._stall_s = self._stall_s, 0.0

    def on_stop(self, state: TrainState, outcome: Outcome) -> Outcome:
        """Every rank: the checkpoint of `state` is written (waited for), unless this step's is already."""
        with self.phases.saving(self.run.env.is_main):
            self._save(state)
            self.checkpoints.writer.wait()
        return dataclasses.replace(outcome, checkpoint=self.run.run_dir / ckpt.LAST)

    def on_run_end(self, state: TrainState, outcome: Outcome) -> None:
        if outcome.finished:
            with self.phases.saving(self.run.env.is_main):
                self.checkpoints.writer.wait()
