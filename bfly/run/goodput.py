"""Goodput: how much of a job's time trained the model, and where the rest went.

From the records a run leaves (attempts.jsonl, progress.json, metrics.jsonl), the job's wall clock, from
the first attempt's process start to the last attempt's end, is split into parts that add up to it:

  queued            after a requeue, waiting for SLURM to start the job again (from SLURM's start time
                    of the allocation; without it, the wait counts as restart)
  start-up          process start -> the first step: imports, rendezvous, data, compile (the steps
                    between the first and the first logged one, train.log_every, count as training at
                    the attempt's step time)
  training          steps kept: the time of the steps the final model is made of
  recomputed        steps trained again after a resume: the work an attempt lost since its last checkpoint
                    (the steps it trained past that checkpoint, at its own step time)
  evaluation        each epoch's evaluation (metrics.jsonl eval_s)
  checkpoint stall  training waiting for checkpoints (metrics.jsonl ckpt_stall_s), and the checkpoint an
                    attempt stopped by a signal or a budget writes on its way out
  hang detection    the last progress -> the hang declared by the watchdog
  restart           an attempt's end (or, without an end record, its last logged step) -> the next start
  other             the rest: shutdown after the last step (wandb, the process group)

GPU-hours are world size x seconds ("GPU": a process, a rank's slot, on CPU runs); the gap after an
attempt counts at that attempt's world size. Each attempt's row holds its own parts and the gap after
it, so a fault's row shows what it cost: the work it lost, the hang detection, the restart and queue.
The headline is the effective training time ratio: training / wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bfly.run.runlog import read_attempts, read_metrics, read_progress

PARTS = {
    "training": "training",
    "startup": "start-up",
    "evaluation": "evaluation",
    "checkpoint": "checkpoint stall",
    "recomputed": "recomputed",
    "hang": "hang detection",
    "restart": "restart",
    "queued": "queued",
    "other": "other",
}
# Where the time between an attempt's last work and its end goes, by how it ended (attempts.jsonl).
TAIL = {"hang": "hang", "signal": "checkpoint", "budget": "checkpoint"}


@dataclass
class AttemptTime:
    attempt: int
    ended: str  # attempts.jsonl's "ended", or "no end record"
    world_size: int
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    recomputed_steps: int = 0

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def lost_gpu_hours(self) -> float:
        return self.world_size * (self.total_s - self.seconds["training"]) / 3600


@dataclass
class Goodput:
    attempts: list[AttemptTime]

    @property
    def seconds(self) -> dict[str, float]:
        return {part: sum(a.seconds[part] for a in self.attempts) for part in PARTS}

    @property
    def gpu_hours(self) -> dict[str, float]:
        return {part: sum(a.world_size * a.seconds[part] for a in self.attempts) / 3600 for part in PARTS}

    @property
    def total_s(self) -> float:
        return sum(a.total_s for a in self.attempts)

    @property
    def ratio(self) -> float:
        """The effective training time ratio: training / wall clock."""
        return self.seconds["training"] / self.total_s if self.total_s > 0 else 0.0


def _time(record: dict[str, Any]) -> float:
    """A record's unix time: the precise one where written, else its ISO time (to the second)."""
    if record.get("unix_time") is not None:
        return float(record["unix_time"])
    return datetime.fromisoformat(record["time"]).timestamp()


def _progress(attempts: list[dict[str, Any]], i: int, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """How far attempt i got: its end record says; without one, the next start does (or progress.json)."""
    a = attempts[i]
    if a["end"] is not None:
        return a["end"].get("progress")
    if i + 1 < len(attempts):
        return attempts[i + 1].get("previous_progress")
    return live if live and live.get("time", 0) >= _time(a) else None  # progress.json: this attempt's?


def _work_end(a: dict[str, Any], progress: dict[str, Any] | None, epochs: list[dict[str, Any]], begun: float) -> float:
    """When the attempt's last work (a step, an epoch's evaluation and checkpoint) ended."""
    end = a["end"]
    logged_last = progress is not None and (end is None or progress["step"] == end["global_step"])
    if not logged_last and end is not None and end.get("stalled_s") is not None:
        # The step it hung at was not logged (train.log_every): the watchdog's measure of the last progress.
        last = _time(end) - float(end["stalled_s"])
    else:
        last = float(progress["time"]) if progress else begun
    return max([last, begun, *(r["time"] + r.get("ckpt_stall_s", 0.0) for r in epochs)])


def _active_parts(
    a: dict[str, Any], nxt: dict[str, Any] | None, progress: dict[str, Any] | None, epochs: list, active: float
) -> tuple[dict[str, float], int, float]:
    """The parts of an attempt's time from its first logged step to its last work, the steps it lost and
    its seconds per step."""
    evaluation = min(sum(r.get("eval_s", 0.0) for r in epochs), active)
    checkpoint = min(sum(r.get("ckpt_stall_s", 0.0) for r in epochs), active - evaluation)
    rest = active - evaluation - checkpoint
    end = a["end"]
    last_step = end["global_step"] if end else (progress["step"] if progress else a["start_step"])
    lost = max(last_step - nxt["start_step"], 0) if nxt else 0  # trained past the checkpoint resumed from
    steps = max(last_step - (progress["first_step"] if progress else a["start_step"]), 1)
    recomputed = min(rest, lost * rest / steps)
    parts = {
        "evaluation": evaluation,
        "checkpoint": checkpoint,
        "recomputed": recomputed,
        "training": rest - recomputed,
    }
    return parts, lost, rest / steps


def account(
    attempts: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
    live: dict[str, Any] | None = None,
    now: float | None = None,
) -> Goodput:
    """The goodput of a run from its records: attempts (bfly.run.runlog.read_attempts), its metrics.jsonl
    records, `live`: progress.json (the last attempt's, when it has no end record), `now`: the last attempt
    is under way until now (None: it ended at its end record, or at its last record)."""
    rows: list[AttemptTime] = []
    previous_end: float | None = None
    for i, a in enumerate(attempts):
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        progress = _progress(attempts, i, live)
        # A run directory has one job at a time: an attempt begins no earlier than the previous one ended.
        begun = max(_begin_of(a), previous_end or 0.0)
        started = max(begun, _time(a))  # its start record: start-up checks passed, training begins
        until = _time(nxt) if nxt else float("inf")  # the next attempt's epochs end after its start record
        epochs = [r for r in metrics if "time" in r and begun <= r["time"] < until]
        work_end = _work_end(a, progress, epochs, started)
        if a["end"] is not None:
            finish = _time(a["end"])
        elif nxt is None and now is not None:
            finish = work_end = max(now, work_end)  # under way
        else:
            finish = work_end  # killed: the time after its last record counts as restart
        work_end = min(work_end, finish)
        first = min(max(float(progress["first_time"]), begun) if progress else started, work_end)
        row = AttemptTime(a["attempt"], a["end"]["ended"] if a["end"] else "no end record", a.get("world_size") or 1)
        row.seconds["startup"] = first - begun
        parts, row.recomputed_steps, step_s = _active_parts(a, nxt, progress, epochs, work_end - first)
        row.seconds.update(parts)
        if progress:  # start-up ends at the first step: the steps before the first log point trained
            early = max(progress["first_step"] - a["start_step"] - 1, 0) * step_s
            early = min(early, row.seconds["startup"])
            row.seconds["startup"] -= early
            row.seconds["training"] += early
        row.seconds[TAIL.get(row.ended, "other")] += finish - work_end
        if nxt is not None:
            row.seconds.update(_gap(finish, max(_begin_of(nxt), finish), nxt.get("slurm_start_time")))
        rows.append(row)
        previous_end = finish
    return Goodput(rows)


def _begin_of(a: dict[str, Any]) -> float:
    return float(a.get("process_start") or _time(a))


def _gap(finish: float, begun: float, slurm_start: float | None) -> dict[str, float]:
    """An attempt's end -> the next start: queued until SLURM started the job again (when it says so), the
    rest restart."""
    if slurm_start is not None and finish < slurm_start <= begun:
        return {"queued": slurm_start - finish, "restart": begun - slurm_start}
    return {"queued": 0.0, "restart": begun - finish}


def of_run(run_dir: Path, now: float | None = None) -> Goodput | None:
    """The goodput of a run directory, None when it has no attempts.jsonl. now: see `account`."""
    attempts = read_attempts(run_dir)
    if not attempts:
        return None
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return account(attempts, metrics, read_progress(run_dir, 0), now)


# --- tables and the wandb summary ----------------------------------------------------------------------


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parts_table(g: Goodput) -> str:
    """Markdown: each part's seconds, share of the wall clock and GPU-hours."""
    total, seconds, hours = g.total_s, g.seconds, g.gpu_hours
    lines = ["| part | seconds | % of wall clock | GPU-hours |", "|---|---:|---:|---:|"]
    for part, label in PARTS.items():
        share = seconds[part] / total if total > 0 else 0.0
        lines.append(f"| {label} | {seconds[part]:.1f} | {share:.1%} | {hours[part]:.4f} |")
    lines.append(f"| **wall clock** | {total:.1f} | 100.0% | {sum(hours.values()):.4f} |")
    return "\n".join(lines)


def attempts_table(g: Goodput) -> str:
    """Markdown: each attempt's parts in seconds (the gap after it included) and the GPU-hours it lost."""
    labels = [label for part, label in PARTS.items()]
    lines = [
        "| # | ended | ranks | " + " | ".join(labels) + " | recomputed steps | lost GPU-hours |",
        "|---:|---|---:|" + "---:|" * len(labels) + "---:|---:|",
    ]
    for a in g.attempts:
        cells = " | ".join(f"{a.seconds[part]:.1f}" for part in PARTS)
        lines.append(
            f"| {a.attempt} | {a.ended} | {a.world_size} | {cells} | {a.recomputed_steps} | {a.lost_gpu_hours:.4f} |"
        )
    return "\n".join(lines)


def report(g: Goodput) -> str:
    """The headline, the parts and the attempts, as markdown."""
    hours = g.gpu_hours
    lost = sum(hours.values()) - hours["training"]
    return "\n".join(
        [
            f"Effective training time ratio: **{g.ratio:.1%}** (training / wall clock {_hms(g.total_s)}); "
            f"{lost:.4f} of {sum(hours.values()):.4f} GPU-hours did not train kept steps.",
            "",
            parts_table(g),
            "",
            attempts_table(g),
        ]
    )


def summary(g: Goodput) -> dict[str, Any]:
    """The wandb summary field `goodput`."""
    return {
        "goodput": {
            "ratio": g.ratio,
            "wall_clock_s": g.total_s,
            "gpu_hours": sum(g.gpu_hours.values()),
            "seconds": {label: g.seconds[part] for part, label in PARTS.items()},
            "gpu_hours_by_part": {label: g.gpu_hours[part] for part, label in PARTS.items()},
            "attempts": len(g.attempts),
        }
    }
