"""Evaluation at the end of each epoch, on every split of train.eval_splits, and the best epoch so far
(by valid top-1, else the first split's): its record goes into best.pt (bfly.run.checkpoints)."""

from __future__ import annotations

import time

from bfly.core.engine import TrainState, evaluate
from bfly.core.stack import evaluated_model
from bfly.run.build import Run
from bfly.run.loop import Callback, EpochEnd
from bfly.run.phases import Phases


class Evaluation(Callback):
    def __init__(self, run: Run, phases: Phases):
        self.run, self.phases = run, phases

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        run, t = self.run, self.run.trainer
        for split, eval_input in run.eval_inputs.items():
            end.metrics[split] = evaluate(
                evaluated_model(t),
                self.phases.batches(eval_input.batches(), split),
                run.meta.num_classes,
                run.device,
                t.amp_dtype,
                t.channels_last,
            )
        for split, m in end.metrics.items():
            end.record.update({f"{split}_loss": m["loss"], f"{split}_top1": m["top1"], f"{split}_top5": m["top5"]})
        end.record["time"] = time.time()  # when the epoch's evaluation was done
        key = "valid" if "valid" in end.metrics else next(iter(end.metrics), None)
        end.best = key is not None and end.metrics[key]["top1"] > state.best_top1
        if key is not None and end.best:
            state.best_top1 = end.metrics[key]["top1"]
