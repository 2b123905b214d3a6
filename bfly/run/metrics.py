"""What a run reports as it trains: the record of each log point (progress line, sinks) and of each epoch
(metrics.jsonl, console, sinks), the line of a stop, and the end (the sinks' final report)."""

from __future__ import annotations

import time
from typing import Any

import torch

from bfly.core import distributed
from bfly.core.engine import TrainState, device_clock
from bfly.core.stack import evaluated_model
from bfly.run.build import Run
from bfly.run.loop import Callback, EpochEnd, LogPoint
from bfly.run.outcome import Outcome
from bfly.run.phases import Phases
from bfly.run.runlog import epoch_line, epoch_record, step_record


class EpochRecord(Callback):
    """Opens each epoch's record with its training figures, over all ranks (the components after it add
    theirs): its time, and its images per second counting only those trained by this job."""

    def __init__(self, run: Run, phases: Phases):
        self.run, self.phases = run, phases
        self._t0 = 0.0
        self._images_before = torch.zeros(())  # images of this epoch counted before this job (a resume)

    def on_epoch_start(self, state: TrainState) -> None:
        # Nothing is read back here (no wait for the device): the count restored from a checkpoint is summed
        # over the ranks at the epoch's end, with the others. The host's clock: the last epoch's end (or the
        # start-up) left nothing queued on the device.
        self._t0 = time.perf_counter()
        self._images_before = state.sums["count"].clone()

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        epoch_s = device_clock(self.run.device) - self._t0
        self.phases.enter("collective")
        sums = {k: distributed.all_reduce_sum(v.clone()) for k, v in end.sums.items()}
        before = int(distributed.all_reduce_sum(self._images_before).item())
        lr = self.run.trainer.optimizer.param_groups[0]["lr"]
        end.record.update(epoch_record(end.epoch, state.global_step, sums, lr, epoch_s, before))


class MetricsLog(Callback):
    """Writes what the components recorded: the log points' progress lines and sink records, the epochs'
    metrics.jsonl lines, the stop line of every rank and, at the end, the sinks' final report (wandb)."""

    def __init__(self, run: Run):
        self.run = run
        self.last_eval: dict[str, Any] = {}  # split -> metrics of the latest evaluation

    def on_log(self, state: TrainState, point: LogPoint) -> None:
        run, steps, epochs = self.run, self.run.train_input.steps_per_epoch, self.run.cfg.train.epochs
        mem = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        rates = point.rates  # read back by bfly.run.exchange
        record, fields = step_record(rates["loss"], rates["top1"], rates, run.env.world_size, state.epoch, mem)
        record.update(point.record)
        fields.update(point.fields)
        run.log.step(record, state.global_step)
        eta = (steps * epochs - state.global_step) * run.plan.batch_size / max(record["img_per_s"], 1e-9)
        run.log.progress(state.epoch, epochs, state.step_in_epoch, steps, eta, fields)

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        self.last_eval = end.metrics
        self.run.log.epoch(end.record, state.global_step)
        self.run.log.info(epoch_line(end.record, self.run.cfg.train.epochs))

    def on_stop(self, state: TrainState, outcome: Outcome) -> Outcome:
        """One line per rank says why the run stopped and where its checkpoint is."""
        run, last = self.run, outcome.checkpoint
        where = (
            f"epoch {state.epoch + 1} step {state.step_in_epoch}"
            if state.step_in_epoch
            else f"the end of epoch {state.epoch}"
        )
        why = outcome.stopped_by
        if run.env.is_main:
            run.log.info(
                f"stopped by {why}: checkpoint at {where} written to {last}; run again (run.resume=auto) to continue"
            )
        else:
            print(
                f"[rank {run.env.rank}] stopped by {why}: checkpoint at {where} written to {last} by rank 0", flush=True
            )
        return outcome

    def on_run_end(self, state: TrainState, outcome: Outcome) -> None:
        run = self.run
        if outcome.finished:
            run.log.info(f"done: best valid top1 {state.best_top1:.2%}; checkpoints in {run.run_dir}")
        for sink in run.log.sinks:
            sink.finish(
                outcome.finished,
                run.stop.signal_name,
                self.last_eval,
                run.meta,
                run.cfg.wandb.samples,
                self._probabilities,
            )

    def _probabilities(self, images: list) -> torch.Tensor:
        from bfly.core.trained import class_probs

        with self.run.trainer.autocast():
            return class_probs(evaluated_model(self.run.trainer), images, self.run.cfg.data.image_size, self.run.device)
