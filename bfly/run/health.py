"""Per-rank health at log points: where each rank's step time goes, and which rank holds the others up.

Under DDP every rank waits for the slowest at each gradient all-reduce, so a slow rank (a bad node, a
throttled GPU, a slow disk) slows the whole job while rank 0's own figures look normal. Every
train.log_every steps each rank measures, per step over the window since the last log point:

* data wait: waiting for its next batch (bfly.engine's measure);
* collective wait: time blocked in collectives, waiting for the other ranks: from the moment its last
  gradient was ready (a hook on each parameter) until the backward pass returned (the gradient
  all-reduce), plus DDP's buffer broadcast before each forward pass and SyncBatchNorm's statistics in
  it (hooks on the wrapper and the modules; not under model.compile, where only the all-reduce wait
  is measured);
* compute: the rest of the step (forward, backward, optimizer);
* peak memory: the GPU's peak allocation, or on CPU the process's peak resident size.

The figures travel on the collective that already runs at log points (bfly.run.exchange, with the
running sums and the stop flag): one all-reduce of a table in which each rank fills its own row. Rank 0 names
a straggler when one rank's own work (step time less its collective wait) is over STRAGGLER_RATIO x
the median of the other ranks' at STRAGGLER_POINTS log points in a row: a warning in the console and
train.log, and `slow rank R (host) 2.1x` in the progress lines while it lasts. Per-rank figures go to
wandb at each log point (rank<R>/data_ms, ...) and, as the epoch's means, to metrics.jsonl ("health").

On CPU (gloo) these are host times of synchronous work: exact. On a GPU no synchronisation is added:
data wait is exact, compute and collective wait are the host's side of them (the host queues kernels
ahead of the GPU), so a rank slowed in its input path is named, one slowed on its GPU may not be.
"""

from __future__ import annotations

import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from bfly.core import distributed
from bfly.core.engine import TrainState
from bfly.core.env import DistEnv
from bfly.core.models.syncbn import SyncBatchNorm2d
from bfly.run.loop import Callback, EpochEnd, LogPoint

STRAGGLER_RATIO = 1.3
STRAGGLER_POINTS = 3
FIELDS = ("step_ms", "data_ms", "comm_ms", "compute_ms", "mem_gb")  # per step, each rank's row after the stop flag


class RankHealth(Callback):
    """One per trainer process of a distributed run: a component of its loop, and a rider of its stop
    agreement (bfly.run.stops), whose collective carries each rank's row of figures."""

    width = len(FIELDS)

    def __init__(
        self,
        model: nn.Module,
        env: DistEnv,
        device: torch.device,
        hosts: list[str],
        warn: Callable[[str], None] = print,
    ):
        self.env, self.device, self.hosts, self.warn = env, device, hosts, warn
        self._comm_s = 0.0
        self._entered: dict[str, float] = {}  # a collective wait's start, by kind, until its end is seen
        self.latest: torch.Tensor | None = None  # [world, FIELDS] at the last log point (rank 0)
        self._candidates: list[int | None] = []  # per log point: the rank over the ratio, or None
        self.straggler: tuple[int, float] | None = None  # (rank, ratio) while one is named
        self._epoch_rows: list[torch.Tensor] = []
        for p in model.parameters():
            if p.requires_grad:  # the last gradient ready: the all-reduce's wait begins (ends after backward)
                p.register_post_accumulate_grad_hook(partial(self._enter, "all-reduce"))
        inner = None if hasattr(model, "_orig_mod") else getattr(model, "module", None)
        if isinstance(inner, nn.Module):  # DDP, not compiled: its forward syncs buffers before the module's
            model.register_forward_pre_hook(partial(self._enter, "broadcast"))
            inner.register_forward_pre_hook(partial(self._leave, "broadcast"))
            # SyncBatchNorm's statistics are a collective in the forward pass: the first one is where a
            # rank waits for a slower one (the ranks start each step together again after it).
            for m in inner.modules():
                if isinstance(m, SyncBatchNorm2d):
                    m.register_forward_pre_hook(partial(self._enter, "syncbn"))
                    m.register_forward_hook(partial(self._leave, "syncbn"))

    @classmethod
    def start(
        cls, model: nn.Module, env: DistEnv, device: torch.device, warn: Callable[[str], None]
    ) -> RankHealth | None:
        """None for a single process (nothing to compare). Gathers the hosts once, at start-up. warn: where
        the straggler's warning goes (the run's log)."""
        if not env.distributed:
            return None
        return cls(model, env, device, distributed.all_gather_objects(socket.gethostname()), warn)

    def _enter(self, kind: str, *_: Any) -> None:
        self._entered[kind] = time.perf_counter()

    def _leave(self, kind: str, *_: Any) -> None:
        """The wait of `kind` entered last ends now: its time counts as collective wait."""
        entered = self._entered.pop(kind, None)
        if entered is not None:
            self._comm_s += time.perf_counter() - entered

    def after_backward(self) -> None:
        self._leave("all-reduce")

    def row(self, point: LogPoint) -> list[float]:
        """This rank's figures per step of the window that ends at this log point, on the host's clock."""
        window = point.window
        steps = max(window.steps, 1)
        window_ms, data_ms, comm_ms = (
            (window.ended - window.started) * 1e3,
            window.data_wait_s * 1e3,
            self._comm_s * 1e3,
        )
        compute_ms = max(window_ms - data_ms - comm_ms, 0.0)
        self._comm_s = 0.0
        return [window_ms / steps, data_ms / steps, comm_ms / steps, compute_ms / steps, _peak_memory_gb(self.device)]

    def on_log(self, state: TrainState, point: LogPoint) -> None:
        point.record.update(self.step_record())  # the figures that arrived with this log point's exchange
        point.fields.update(self.progress_fields())

    def arrived(self, table: torch.Tensor, point: LogPoint) -> None:
        """Every rank's figures at this log point (bfly.run.exchange); rank 0 then updates the
        straggler, and warns when it changed."""
        if not self.env.is_main:
            return
        named = self.straggler
        self.latest = table
        self._epoch_rows.append(self.latest)
        self._update_straggler()
        if line := self.warning(named):
            self.warn(line)

    def on_epoch_end(self, state: TrainState, end: EpochEnd) -> None:
        if ranks := self.epoch_summary():
            end.record["health"] = ranks

    def _update_straggler(self) -> None:
        assert self.latest is not None
        step, comm = self.latest[:, FIELDS.index("step_ms")], self.latest[:, FIELDS.index("comm_ms")]
        own = (step - comm).tolist()  # each rank's own work: what it did not spend waiting for the others
        slowest = max(range(len(own)), key=own.__getitem__)
        others = statistics.median(own[:slowest] + own[slowest + 1 :])
        ratio = own[slowest] / max(others, 1e-9)
        self._candidates = [*self._candidates[-(STRAGGLER_POINTS - 1) :], slowest if ratio > STRAGGLER_RATIO else None]
        named = self._candidates[0] if len(set(self._candidates)) == 1 else None
        if len(self._candidates) == STRAGGLER_POINTS and named is not None:
            self.straggler = (named, ratio)
        elif self.straggler is not None and all(c != self.straggler[0] for c in self._candidates):
            self.straggler = None

    def warning(self, previous: tuple[int, float] | None) -> str | None:
        """The line to log when the straggler changed since `previous` (rank 0)."""
        if self.straggler is None or self.latest is None:
            if previous is not None:
                return f"rank {previous[0]} ({self.hosts[previous[0]]}) keeps up again"
            return None
        if previous is not None and previous[0] == self.straggler[0]:
            return None
        rank, ratio = self.straggler
        row = dict(zip(FIELDS, self.latest[rank].tolist(), strict=True))
        others = [r for r in range(len(self.hosts)) if r != rank]
        waits = statistics.median(self.latest[others, FIELDS.index("comm_ms")].tolist())
        return (
            f"rank {rank} ({self.hosts[rank]}) is a straggler: {ratio:.1f}x the other ranks' own work per step "
            f"for {STRAGGLER_POINTS} log points (data wait {row['data_ms']:.0f} ms, compute "
            f"{row['compute_ms']:.0f} ms per step); the others wait {waits:.0f} ms per step for it in DDP's collectives"
        )

    def progress_fields(self) -> dict[str, str]:
        if self.straggler is None:
            return {}
        rank, ratio = self.straggler
        return {"slow": f"rank {rank} ({self.hosts[rank]}) {ratio:.1f}x"}

    def step_record(self) -> dict[str, float]:
        """Per-rank figures of the last log point, for wandb (rank 0)."""
        if self.latest is None:
            return {}
        return {
            f"rank{r}/{k}": v for r, row in enumerate(self.latest.tolist()) for k, v in zip(FIELDS, row, strict=True)
        }

    def epoch_summary(self) -> dict[str, Any]:
        """The epoch's per-rank means over its log points and the straggler at its end, for metrics.jsonl."""
        rows, self._epoch_rows = self._epoch_rows, []
        if not rows:
            return {}
        mean = torch.stack(rows).mean(0)
        summary: dict[str, Any] = {"hosts": self.hosts}
        for i, key in enumerate(FIELDS):
            summary[key] = [round(v, 3) for v in mean[:, i].tolist()]
        summary["mem_gb"] = [
            round(v, 3) for v in torch.stack(rows)[:, :, FIELDS.index("mem_gb")].max(0).values.tolist()
        ]
        summary["straggler"] = (
            {"rank": self.straggler[0], "host": self.hosts[self.straggler[0]], "ratio": round(self.straggler[1], 2)}
            if self.straggler
            else None
        )
        return summary


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Linux reports the peak resident size in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
