"""A log point's one read-back from the device (every train.log_every steps).

Every rank puts one row into a table on its device: the epoch's running sums (loss, correct, count, for the
progress line) and what its riders add (the stop agreement's flag, health's figures). One all-reduce gives
every rank every row; one copy brings the table to the host: the only time a log point waits for the
device. The window's rates are taken after it, so they count the device's time, not the host's queueing.
Everything else at a log point is host work on what arrived.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from bfly.core import distributed
from bfly.core.engine import TrainState
from bfly.core.env import DistEnv
from bfly.run.loop import Callback, LogPoint
from bfly.run.phases import Phases

SUMS = ("loss", "correct", "count")  # the running sums that travel, in this order, first in each row


class Rider(Protocol):
    """What travels with the log point's exchange: one row of `width` numbers per rank."""

    width: int

    def row(self, point: LogPoint) -> list[float]: ...  # this rank's, from the host's figures of the window
    def arrived(self, table: torch.Tensor, point: LogPoint) -> None: ...  # [world size, width], on the host


class LogExchange(Callback):
    """Reads each log point's figures back in one table; fills in the point's rates for the components after
    it (the progress line's loss and accuracy over every rank, images per second, data wait)."""

    def __init__(self, env: DistEnv, device: torch.device, phases: Phases, riders: list[Rider]):
        self.env, self.device, self.phases, self.riders = env, device, phases, riders
        width = sum(r.width for r in riders)
        # The riders' host numbers go to the device from pinned memory without waiting: a copy from
        # pageable memory would wait for every queued kernel first. Reused: the previous one has landed
        # (its table was read back).
        self._row = torch.zeros(width, dtype=torch.float64, pin_memory=device.type == "cuda")

    def on_log(self, state: TrainState, point: LogPoint) -> None:
        table = self._table(state, point)
        if self.env.distributed:
            self.phases.enter("collective")
            distributed.all_reduce_sum(table)
        host = table.cpu()  # the log point's one wait for the device
        point.read_at = time.perf_counter()
        window = point.window
        seconds = max(point.read_at - window.started, 1e-9)
        loss, correct, count = host[:, : len(SUMS)].sum(0).tolist()
        point.rates = {
            "loss": loss / max(count, 1),
            "top1": correct / max(count, 1),
            "img_per_s": window.images / seconds,
            "data_wait": window.data_wait_s / seconds,
            "lr": window.lr,
            "window_s": seconds,
        }
        column = len(SUMS)
        for rider in self.riders:
            rider.arrived(host[:, column : column + rider.width], point)
            column += rider.width

    def _table(self, state: TrainState, point: LogPoint) -> torch.Tensor:
        table = torch.zeros(self.env.world_size, len(SUMS) + len(self._row), dtype=torch.float64, device=self.device)
        mine = table[self.env.rank]
        mine[: len(SUMS)] = torch.stack([state.sums[k].to(torch.float64) for k in SUMS])
        if len(self._row):
            self._row.copy_(torch.tensor([x for r in self.riders for x in r.row(point)], dtype=torch.float64))
            mine[len(SUMS) :] = self._row.to(self.device, non_blocking=True)
        return table
