"""What a run leaves behind and prints: log file, metrics.jsonl, rank-0 progress line, progress.json.

Other ranks are quiet. Extra sinks (wandb) receive the same step and epoch records. progress.json holds
the first and the latest logged step of the attempt under way, with their times: attempts.jsonl keeps
them (bfly.job.attempts), so that an attempt killed without an end record still tells how far it got.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO

from bfly.core.config import ConfigError
from bfly.core.env import stdout_is_tty, wandb_mode_override, wandb_mode_setting

ATTEMPTS = "attempts.jsonl"
PROGRESS = "progress.json"


class Sink(Protocol):
    # The dashboard's id of this run: kept in checkpoints so that a resume continues the same run.
    @property
    def run_id(self) -> str: ...
    def log_step(self, record: dict[str, Any], step: int) -> None: ...
    def log_epoch(self, record: dict[str, Any], step: int) -> None: ...
    def log_config_change(self, changes: dict[str, dict[str, Any]], step: int) -> None: ...
    def note_hang(self, line: str, exit_code: int) -> None: ...
    def finish(
        self,
        completed: bool,
        signal_name: str | None,
        last_eval: dict[str, Any] | None,
        meta: Any,
        samples: int,
        probabilities: Callable[[list], Any],
    ) -> None: ...


class RunLog:
    """Rank 0 prints and keeps train.log. Nothing is written to the run directory until `attach`, which
    the trainer calls once every start-up check has passed: a refused run leaves the directory as it was.
    Lines printed before are written to train.log then."""

    def __init__(self, run_dir: Path, is_main: bool, sinks: list[Sink] | None = None):
        self.run_dir, self.is_main = run_dir, is_main
        self.sinks = sinks or []
        self.tty = stdout_is_tty()
        self._log: TextIO | None = None
        self._pending: list[str] = []
        self._metrics_from_epoch: int | None = None  # drop metrics.jsonl records from here on, at the first write
        self._first_step: tuple[int, float] | None = None  # this job's first logged step and its time

    def attach(self, resume_epoch: int) -> None:
        if not self.is_main:
            return
        self._log = open(self.run_dir / "train.log", "a")
        for line in self._pending:
            self._log.write(line)
        self._pending.clear()
        self._log.flush()
        self._metrics_from_epoch = resume_epoch

    @property
    def attached(self) -> bool:
        return self._log is not None

    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        self._end_progress()
        print(msg, flush=True)
        self.to_file(msg)

    def to_file(self, msg: str) -> None:
        """train.log only (an error the caller prints itself)."""
        if not self.is_main:
            return
        line = stamped(msg)
        if self._log is None:
            self._pending.append(line)
            return
        try:
            self._log.write(line)
            self._log.flush()
        except OSError:  # a full disk must not hide the error being reported
            pass

    def warn(self, msg: str) -> None:
        self.info(f"warning: {msg}")

    def progress(
        self, epoch: int, epochs: int, step: int, steps: int, eta_s: float, fields: dict[str, float | str]
    ) -> None:
        """One plain line; numbers get 4 significant digits, strings (already formatted) pass as they are."""
        if not self.is_main:
            return
        text = f"epoch {epoch + 1}/{epochs} step {step}/{steps} eta {_hms(eta_s)} " + " ".join(
            f"{k} {v}" if isinstance(v, str) else f"{k} {v:.4g}" for k, v in fields.items()
        )
        if self.tty:
            sys.stdout.write("\r" + text + "\033[K")
            sys.stdout.flush()
            self._open_line = True
        else:
            print(text, flush=True)

    def _end_progress(self) -> None:
        if getattr(self, "_open_line", False):
            sys.stdout.write("\n")
            self._open_line = False

    def step(self, record: dict[str, Any], step: int) -> None:
        if self.is_main:
            self._note_progress(step)
            for sink in self.sinks:
                sink.log_step(record, step)

    def _note_progress(self, step: int) -> None:
        if self._log is None:  # not attached: the run directory stays as it was
            return
        now = time.time()
        self._first_step = self._first_step or (step, now)
        first, first_time = self._first_step
        with contextlib.suppress(OSError):  # a full disk must not stop training for a bookkeeping file
            write_progress(self.run_dir, {"first_step": first, "first_time": first_time, "step": step, "time": now})

    def epoch(self, record: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        if self._metrics_from_epoch is not None:  # on resume: no record of an epoch twice
            truncate_metrics(self.run_dir, self._metrics_from_epoch)
            self._metrics_from_epoch = None
        if "eval_start" in record and "time" in record:  # the evaluation ran from eval_start to time
            record["eval_s"] = record["time"] - record.pop("eval_start")
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log_epoch(record, step)

    def close(self) -> None:
        if self._log:
            self._end_progress()
            with contextlib.suppress(OSError):
                self._log.close()


def stamped(msg: str) -> str:
    """A line of train.log: local time, then the message."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n"


def append_to_train_log(run_dir: Path, msg: str) -> None:
    """One stamped line at the end of run_dir/train.log, from outside the run's RunLog (the watchdog's
    thread, the launcher's retry decision). Nothing when the run directory does not exist (yet) or the
    line cannot be written: a full disk must not hide what is being reported."""
    if not run_dir.is_dir():
        return
    with contextlib.suppress(OSError):
        with open(run_dir / "train.log", "a") as f:
            f.write(stamped(msg))


def open_wandb(log: RunLog, mode: str, start: Callable[[], Sink]) -> Sink | None:
    """Rank 0: adds the wandb sink (`start` opens it) to `log`, or says why not. mode: wandb.mode.
    wandb is imported lazily: training without logging must not need it installed."""
    setting = wandb_mode_setting(mode)  # what the user set, to name it
    mode = wandb_mode_override() or mode  # WANDB_MODE wins, as in wandb itself
    if mode == "disabled":
        return None
    try:
        importlib.import_module("bfly.run.wandb_log")  # imports wandb
    except ImportError as e:
        if mode != "auto":
            raise ConfigError(f"{setting} but wandb cannot be imported ({e}); pip install wandb") from None
        log.warn("wandb is not installed: logging to metrics.jsonl only (wandb.mode=disabled silences this)")
        return None
    sink = start()
    log.sinks.append(sink)
    return sink


def step_record(
    loss: float, top1: float, rates: dict[str, float], world_size: int, epoch: int, gpu_mem_gb: float | None
) -> tuple[dict[str, Any], dict[str, float | str]]:
    """(record for the sinks, fields of the progress line) at a log point. loss/top1: this epoch so far,
    over every rank; rates from bfly.run.exchange; data_wait is the share of wall time this rank waited for
    its next batch (the input path's cost)."""
    record = {
        "train/loss": loss,
        "train/top1": top1,
        "lr": rates["lr"],
        "img_per_s": rates["img_per_s"] * world_size,
        "data_wait": rates["data_wait"],
        "epoch": epoch,
    }
    fields: dict[str, float | str] = {
        "loss": loss,
        "acc": f"{top1:.1%}",
        "img/s": record["img_per_s"],
        "lr": rates["lr"],
        "data": f"{rates['data_wait']:.0%}",
    }
    if gpu_mem_gb is not None:
        record["gpu_mem_gb"] = gpu_mem_gb
        fields["mem"] = f"{gpu_mem_gb:.1f}G"
    return record, fields


def epoch_record(
    epoch: int, step: int, sums: dict[str, Any], lr: float, epoch_s: float, images_before: int
) -> dict[str, Any]:
    """The metrics.jsonl record of a finished epoch's training (the evaluation adds its splits). `sums`: the
    epoch's totals over all ranks; images_before: images of the epoch counted before this job (a resume).
    eval_start: the evaluation starts now; RunLog.epoch turns it into eval_s, its seconds, once the
    record's "time" marks its end."""
    count = max(int(sums["count"].item()), 1)
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": sums["loss"].item() / count,
        "train_top1": sums["correct"].item() / count,
        "train_top5": sums["correct5"].item() / count,
        "lr": lr,
        "epoch_s": epoch_s,
        "img_per_s": (count - images_before) / max(epoch_s, 1e-9),
        "eval_start": time.time(),
    }


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    """The console line of an epoch record (metrics.jsonl)."""
    parts = [f"epoch {r['epoch'] + 1}/{epochs}", f"train loss {r['train_loss']:.4f} acc {r['train_top1']:.2%}"]
    for split in ("valid", "test"):
        if f"{split}_top5" in r:
            parts.append(f"{split} top1 {r[f'{split}_top1']:.2%} top5 {r[f'{split}_top5']:.2%}")
    parts.append(f"{r['epoch_s']:.1f}s {r['img_per_s']:.0f} img/s")
    parts.append(f"ckpt stall {r['ckpt_stall_s']:.2f}s")
    return " | ".join(parts)


def truncate_metrics(run_dir: Path, before_epoch: int) -> None:
    """On resume, drop records of epochs the checkpoint does not contain (no repeats in the file)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < before_epoch]
    path.write_text("".join(line + "\n" for line in kept))


def write_progress(run_dir: Path, progress: dict[str, Any]) -> None:
    """Replaces progress.json at once: a kill mid-write leaves the previous one."""
    tmp = run_dir / f".{PROGRESS}.writing"  # no .tmp: that is a checkpoint being written
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, run_dir / PROGRESS)


def read_progress(run_dir: Path, since: float) -> dict[str, Any] | None:
    """The progress of the attempt that started at `since` (unix time: its start record's) or, once it has
    ended, of the last one; None when it logged no step (the file is an older attempt's, or none)."""
    try:
        progress = json.loads((run_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) and progress.get("time", 0) >= since else None


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The attempts of a run (attempts.jsonl, written by bfly.job.attempts), oldest first: each start record
    with its end record (key `end`, or None)."""
    path = run_dir / ATTEMPTS
    if not path.exists():
        return []
    attempts: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill: the attempt it ends has no end record
            continue
        if record.get("event") == "start":
            attempts.append(record | {"end": None})
        elif record.get("event") == "end" and attempts and attempts[-1]["attempt"] == record.get("attempt"):
            attempts[-1]["end"] = attempts[-1]["end"] or record  # the first end line says how it ended
    return attempts


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
