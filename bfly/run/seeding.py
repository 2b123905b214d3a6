"""Per-epoch seeding: each epoch starts its random streams (augmentation, dropout, mixup) from
(train.seed, rank, epoch), so an epoch trains the same whether or not the run was resumed before it."""

from __future__ import annotations

from bfly.core.engine import TrainState
from bfly.core.stack import seed_all
from bfly.run.loop import Callback


class EpochSeed(Callback):
    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def on_epoch_start(self, state: TrainState) -> None:
        if state.step_in_epoch == 0:  # mid-epoch, a resume restored the streams from the checkpoint
            seed_all(self.seed, self.rank, state.epoch)
