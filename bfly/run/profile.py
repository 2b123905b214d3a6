"""train.profile_steps=START:END: a torch.profiler trace of the optimizer steps START+1..END on rank 0.

Into run.dir/profile/: `trace-rank0.json` (Chrome trace format: chrome://tracing, https://ui.perfetto.dev,
or TensorBoard), `top_ops.txt` (the ops that took the most time, also printed once to the log) and, on
CUDA, `memory_snapshot.pickle` (the allocator's history over the window: https://pytorch.org/memory_viz).
Each step of the window is a `ProfilerStep#N` span in the trace. Off by default: the training loop then
holds no profiler and pays one `is None` test per step.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from bfly.core.config import profile_window
from bfly.core.engine import TrainState
from bfly.run.loop import Callback

TOP_OPS = 15  # rows of the table


class StepProfiler(Callback):
    """Starts torch.profiler after global step START, marks each step, writes everything after step END.
    A component of the run's loop: `close` writes what was recorded when the run stops inside the window."""

    def __init__(self, window: tuple[int, int], out: Path, device: torch.device, info: Any):
        self.start, self.end = window
        self.out, self.device, self.info = out, device, info
        self._prof: torch.profiler.profile | None = None
        self.done = False

    @classmethod
    def for_run(cls, profile_steps: str, run_dir: Path, device: torch.device, is_main: bool, info: Any):
        """The run's profiler, or None: profiling off (the default), or not rank 0."""
        window = profile_window(profile_steps)
        if window is None or not is_main:
            return None
        return cls(window, run_dir / "profile", device, info)

    def on_run_start(self, state: TrainState) -> None:
        self.at_step(state.global_step)

    def on_step(self, state: TrainState) -> None:
        self.at_step(state.global_step)

    def at_step(self, global_step: int) -> None:
        """After each optimizer step (and once before the first): start, mark the step, or finish."""
        if self._prof is not None:
            self._prof.step()
            if global_step >= self.end:
                self.close()
        elif not self.done and self.start <= global_step < self.end:
            self._begin(self.end - global_step)

    def _begin(self, steps: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        with warnings.catch_warnings():  # "won't be using warmup": the window is the user's
            warnings.simplefilter("ignore", UserWarning)
            self._prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=0, warmup=0, active=steps, repeat=1),
                on_trace_ready=self._write,
            )
        self._prof.start()

    def _write(self, prof: torch.profiler.profile) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / "trace-rank0.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS)
        (self.out / "top_ops.txt").write_text(table + "\n")
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.out / "memory_snapshot.pickle"))
        self.info(f"profile of steps {self.start + 1}..{self.end} in {self.out}; top ops by time:\n{table}")

    def close(self) -> None:
        """Ends the window (at END, or early when the run stops inside it: what was recorded is written)."""
        if self._prof is None:
            return
        prof, self._prof, self.done = self._prof, None, True
        prof.stop()  # writes through on_trace_ready if the window was not complete yet
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)
