"""Goodput: a job's wall clock and GPU-hours split by cause, from the records a run leaves
(attempts.jsonl, progress.json, metrics.jsonl), and `python -m bfly.report RUN --goodput`.

Default tier: synthetic record sequences with known times (a table of cases). Slow tier: one real run
through a SIGKILL, a hang, a SIGTERM preemption and a requeue after a wait in the queue."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch

from bfly.job import attempts as attempts_file
from bfly.job.exits import EXIT_HANG, EXIT_STOPPED
from bfly.run import goodput
from bfly.run.runlog import read_attempts, read_metrics
from bfly.tools import report

from conftest import run_python
from probes.fault_launch import Launch, fault_args, run_to_end, train_cmd

T0 = 1_800_000_000.0  # the first process start of every synthetic job


def start(n: int, process: float, record: float, step: int, world: int = 1, **extra: Any) -> dict[str, Any]:
    """A start record as attempts.read returns it (times in seconds after T0)."""
    return {
        "event": "start",
        "attempt": n,
        "time": datetime.fromtimestamp(T0 + record, timezone.utc).isoformat(timespec="seconds"),
        "unix_time": T0 + record,
        "process_start": T0 + process,
        "world_size": world,
        "start_step": step,
        "end": None,
        **extra,
    }


def end(n: int, at: float, how: str, step: int, progress: dict | None = None, **extra: Any) -> dict[str, Any]:
    return {"event": "end", "attempt": n, "unix_time": T0 + at, "ended": how, "global_step": step} | (
        {"progress": progress} if progress else {}
    ) | extra  # fmt: skip


def progress(first_step: int, first: float, step: int, at: float) -> dict[str, Any]:
    return {"first_step": first_step, "first_time": T0 + first, "step": step, "time": T0 + at}


def epoch(n: int, at: float, eval_s: float, ckpt_s: float) -> dict[str, Any]:
    """A metrics.jsonl record: its evaluation ended at `at`, then its checkpoint stalled ckpt_s."""
    return {"epoch": n, "time": T0 + at, "eval_s": eval_s, "ckpt_stall_s": ckpt_s}


def clean() -> tuple[list, list]:
    # Start-up 30 s, 3 epochs of 100 s each ending with a 10 s evaluation and a 2 s checkpoint, 5 s shutdown.
    a = start(1, 0, 20, 0)
    a["end"] = end(1, 341, "finished", 30, progress(1, 30, 30, 300))
    return [a], [epoch(0, 130, 10, 2), epoch(1, 232, 10, 2), epoch(2, 334, 10, 2)]


def crash_with_recompute() -> tuple[list, list]:
    # Killed at step 51 (2 s per step from step 1 at t=15), last checkpoint at step 41: 10 steps lost.
    first = start(1, 0, 10, 0)
    second = start(2, 130, 140, 41, previous_progress=progress(1, 15, 51, 115))
    second["end"] = end(2, 245, "finished", 100, progress(42, 150, 100, 240))
    return [first, second], []


def hang() -> tuple[list, list]:
    # 5 s per step from step 1 (t=20); stalled after step 25 (t=140), declared hung 60 s later; resumed from
    # step 15: 10 steps lost.
    first = start(1, 0, 10, 0)
    first["end"] = end(1, 200, "hang", 25, progress(1, 20, 25, 140), stalled_s=60.0, detail="hang: ...")
    second = start(2, 210, 220, 15)
    second["end"] = end(2, 300, "finished", 40, progress(16, 225, 40, 300))
    return [first, second], []


def preemption_with_queue() -> tuple[list, list]:
    # SIGTERM at step 40 (t=95), the stop's checkpoint until t=100; requeued, SLURM started it at t=400.
    first = start(1, 0, 10, 0, world=4)
    first["end"] = end(1, 100, "signal", 40, progress(1, 15, 40, 95), detail="SIGTERM")
    second = start(2, 410, 420, 40, world=4, slurm_start_time=T0 + 400)
    second["end"] = end(2, 520, "finished", 80, progress(41, 430, 80, 515))
    return [first, second], []


def missing_end_record() -> tuple[list, list]:
    # The last attempt was killed and never resumed: its time ends at its last logged step.
    first = start(1, 0, 10, 0)
    return [first], []


CASES = {
    # name: (records, the parts expected in seconds, recomputed steps per attempt)
    "clean run": (
        clean,
        {"startup": 30, "evaluation": 30, "checkpoint": 6, "other": 5, "training": 270},
        [0],
    ),
    "crash with recompute": (
        crash_with_recompute,
        {"startup": 15 + 20, "training": 80 + 90, "recomputed": 20, "restart": 15, "other": 5},
        [10, 0],
    ),
    "hang": (
        hang,
        {"startup": 20 + 15, "training": 70 + 75, "recomputed": 50, "hang": 60, "restart": 10},
        [10, 0],
    ),
    "preemption and requeue with a queue gap": (
        preemption_with_queue,
        {"startup": 15 + 20, "training": 80 + 85, "checkpoint": 5, "queued": 300, "restart": 10, "other": 5},
        [0, 0],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_each_second_of_the_job_is_attributed_to_one_cause(name):
    build, expected, recomputed_steps = CASES[name]
    attempts, metrics = build()
    g = goodput.account(attempts, metrics)
    seconds = {part: round(s, 6) for part, s in g.seconds.items() if round(s, 6)}
    assert seconds == {part: pytest.approx(s) for part, s in expected.items()}
    wall_clock = attempts[-1]["end"]["unix_time"] - attempts[0]["process_start"]
    assert g.total_s == pytest.approx(wall_clock)
    assert g.ratio == pytest.approx(expected["training"] / wall_clock)
    assert [a.recomputed_steps for a in g.attempts] == recomputed_steps


def test_a_hang_at_a_step_not_logged_is_timed_by_the_watchdog():
    """train.log_every > 1: the last logged step came before the last progress the watchdog saw."""
    attempts, metrics = hang()
    attempts[0]["end"]["progress"] = progress(1, 20, 23, 130)
    g = goodput.account(attempts, metrics)
    assert g.attempts[0].seconds["hang"] == 60 and g.attempts[0].recomputed_steps == 10


def test_steps_before_the_first_log_point_count_as_training_at_the_attempts_step_time():
    """train.log_every=10: the first logged step is step 10; steps 2-10 took the steady 2 s each."""
    a = start(1, 0, 20, 0)
    a["end"] = end(1, 90, "finished", 30, progress(10, 50, 30, 90))
    g = goodput.account([a], [])
    assert g.seconds["startup"] == pytest.approx(50 - 9 * 2) and g.seconds["training"] == pytest.approx(40 + 18)


def test_gpu_hours_are_world_size_times_seconds_and_each_attempt_carries_its_cost():
    attempts, metrics = preemption_with_queue()
    g = goodput.account(attempts, metrics)
    assert g.gpu_hours["queued"] == pytest.approx(4 * 300 / 3600)
    assert sum(g.gpu_hours.values()) == pytest.approx(4 * 520 / 3600)
    first, second = g.attempts
    assert first.ended == "signal" and second.ended == "finished"
    # The preempted attempt's row holds its stop checkpoint, the wait in the queue and the restart after it.
    assert (first.seconds["checkpoint"], first.seconds["queued"], first.seconds["restart"]) == (5, 300, 10)
    assert first.lost_gpu_hours == pytest.approx(4 * (100 + 310 - 80) / 3600)


def test_a_requeue_without_slurm_start_time_counts_the_whole_wait_as_restart():
    attempts, metrics = preemption_with_queue()
    del attempts[1]["slurm_start_time"]
    g = goodput.account(attempts, metrics)
    assert (g.seconds["queued"], g.seconds["restart"]) == (0, 310)


def test_a_killed_last_attempt_ends_at_its_last_logged_step_or_runs_until_now():
    attempts, metrics = missing_end_record()
    live = progress(1, 30, 20, 130)
    g = goodput.account(attempts, metrics, live)
    assert g.attempts[0].ended == "no end record"
    assert g.total_s == pytest.approx(130) and g.seconds["startup"] == pytest.approx(30)
    assert g.seconds["training"] == pytest.approx(100) and g.attempts[0].recomputed_steps == 0
    under_way = goodput.account(attempts, metrics, live, now=T0 + 200)  # the wandb summary at a job's end
    assert under_way.total_s == pytest.approx(200) and under_way.seconds["training"] == pytest.approx(170)
    assert goodput.account(attempts, metrics, None).total_s == pytest.approx(10)  # killed in start-up


def test_attempts_of_one_process_do_not_overlap():
    """Jobs run in one Python process (a notebook, a test) share its start: each begins where the last ended."""
    attempts, metrics = hang()
    attempts[1]["process_start"] = attempts[0]["process_start"]
    g = goodput.account(attempts, metrics)
    assert g.total_s == pytest.approx(300) and g.seconds["restart"] == 0
    assert g.attempts[1].seconds["startup"] == pytest.approx(25)


def test_records_written_before_the_precise_times_still_add_up():
    attempts, metrics = crash_with_recompute()
    for a in attempts:
        for record in (a, a["end"] or {}):
            record.pop("unix_time", None)
            record.pop("process_start", None)
    attempts[1]["end"]["time"] = datetime.fromtimestamp(T0 + 245, timezone.utc).isoformat()
    g = goodput.account(attempts, metrics)
    assert g.total_s == pytest.approx(245 - 10)  # from the first start record to the last end record
    assert g.attempts[0].recomputed_steps == 10


def write_run(run_dir: Path, attempts: list[dict], metrics: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for a in attempts:
        lines.append({k: v for k, v in a.items() if k != "end"})
        if a["end"]:
            lines.append(a["end"] | {"time": datetime.fromtimestamp(a["end"]["unix_time"], timezone.utc).isoformat()})
    (run_dir / attempts_file.FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = [{"train_top1": 0.5, "train_loss": 1.0, **r} for r in metrics]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def parts_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in (*goodput.PARTS.values(), "**wall clock**"):
            rows[cells[0]] = cells[1:]
    return rows


def test_report_goodput_prints_the_parts_and_the_attempts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir, *hang())
    assert report.main([str(run_dir), "--goodput"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"goodput of {run_dir}:\nEffective training time ratio: **48.3%**")
    rows = parts_rows(out)
    assert rows["hang detection"] == ["60.0", "20.0%", "0.0167"]
    assert rows["**wall clock**"] == ["300.0", "100.0%", "0.0833"]
    assert "| 1 | hang | 1 | 70.0 | 20.0 | 0.0 | 0.0 | 50.0 | 60.0 | 10.0 | 0.0 | 0.0 | 10 | 0.0389 |" in out


def test_summary_md_has_a_goodput_section(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, *clean())
    assert report.main([str(run_dir), "--out", str(tmp_path / "report"), "--confusion", "none"]) == 0
    md = (tmp_path / "report/summary.md").read_text()
    section = md.split("## Goodput of run\n", 1)[1]
    assert section.startswith("\nEffective training time ratio: **79.2%** (training / wall clock 0:05:41)")


def test_report_goodput_names_a_run_without_a_history(tmp_path):
    out = run_python("-m", "bfly.report", str(tmp_path), "--goodput", timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"bfly.report: error: {tmp_path / attempts_file.FILE} not found (runs started before it existed have none)"
    )


# --- a real run through its faults (slow tier) ----------------------------------------------------------

HANG_S = 5
STALL_STEP = 7  # in epoch 2 (5 steps per epoch), one step past the step checkpoint at 6


def fault_run_args(data: Path, run_dir: Path) -> list[str]:
    limits = {"run.hang_timeout_s": HANG_S, "run.startup_timeout_s": 60, "run.stop_grace_s": 10}
    return fault_args(data, run_dir, **limits)


def finished_at(launch: Launch) -> float:
    """When (time.monotonic) a run that finished printed its last line: its end record follows at once; the
    process's teardown after it is no part of the job's accounted time."""
    done = [t for t, line in launch.lines if line.startswith("done: best valid top1")]
    assert done, launch.output[-3000:]
    return launch.t0 + done[-1]


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "last.pt", weights_only=True)["global_step"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes through /proc")
def test_a_run_through_a_kill_a_hang_a_preemption_and_a_requeue_is_accounted_cause_by_cause(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = fault_run_args(tiny_data, run)
    began = time.monotonic()
    # 1. A trainer killed (SIGKILL) after step 3: no end record; the steps since its last checkpoint are lost.
    killed = Launch(train_cmd(args), timeout=300)
    killed.wait_step(3)
    os.kill(killed.proc.pid, signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    resumed_from = [checkpoint_step(run)]
    # 2. Stalled in its data path after step 7: the watchdog declares the hang and ends the job.
    hung = Launch(train_cmd(args), timeout=300, env={"BFLY_TEST_STALL": f"0:data:{STALL_STEP}:600"})
    assert hung.wait(240) == EXIT_HANG, hung.output[-3000:]
    resumed_from.append(checkpoint_step(run))
    # 3. Preempted (SIGTERM) after step 8: the stop writes a checkpoint at the step reached.
    preempted = Launch(train_cmd(args), timeout=300)
    preempted.wait_step(STALL_STEP + 1)
    os.kill(preempted.proc.pid, signal.SIGTERM)
    assert preempted.wait(60) == EXIT_STOPPED
    # 4. Requeued: it waits in the queue until SLURM starts it again, then finishes.
    time.sleep(3)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1", "SLURM_JOB_START_TIME": str(int(time.time()))}
    time.sleep(1)
    requeued = Launch(train_cmd(args), timeout=300, env=slurm)
    assert requeued.wait() == 0, requeued.output[-3000:]
    wall_clock = finished_at(requeued) - began

    history = read_attempts(run)
    g = goodput.of_run(run)
    print(goodput.report(g))
    assert [a.ended for a in g.attempts] == ["no end record", "hang", "signal", "finished"]
    # Recomputed: the steps each attempt trained past the checkpoint the next one resumed from.
    killed_at, hung_at = history[1]["previous_progress"]["step"], history[1]["end"]["global_step"]
    assert [a["start_step"] for a in history[1:3]] == resumed_from
    assert hung_at == STALL_STEP and resumed_from[1] == STALL_STEP - 1
    assert [a.recomputed_steps for a in g.attempts] == [killed_at - resumed_from[0], 1, 0, 0]
    first, second, third, fourth = (a.seconds for a in g.attempts)
    assert (first["recomputed"] > 0) == (killed_at > resumed_from[0]) and second["recomputed"] > 0
    # The hang: from the last progress to the verdict, at least the limit.
    assert second["hang"] == pytest.approx(history[1]["end"]["stalled_s"], abs=1) and second["hang"] >= HANG_S
    # The preemption: its stop checkpoint, then the wait in the queue and the restart.
    slurm_start = history[3]["slurm_start_time"]
    assert third["checkpoint"] > 0 and third["queued"] == pytest.approx(slurm_start - history[2]["end"]["unix_time"])
    assert third["queued"] >= 3 and third["restart"] == pytest.approx(history[3]["process_start"] - slurm_start)
    assert all(s["startup"] > 0 and s["training"] > 0 for s in (first, second, third, fourth))
    assert all(s["evaluation"] == 0 for s in (first, third)) and second["evaluation"] > 0 < fourth["evaluation"]
    # Every second is accounted for: the parts add up to the wall clock the test measured.
    assert sum(g.seconds.values()) == pytest.approx(g.total_s)
    assert g.total_s == pytest.approx(wall_clock, rel=0.01)
    print(f"wall clock: measured {wall_clock:.1f} s, accounted {g.total_s:.1f} s")

    out = run_python("-m", "bfly.report", str(run), "--goodput", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| 1 | no end record | 1 |" in out.stdout and "| 2 | hang | 1 |" in out.stdout


@pytest.mark.slow
def test_a_clean_run_loses_only_its_start_up_evaluation_and_checkpoints(tiny_data, tmp_path):
    run = tmp_path / "run"
    began = time.monotonic()
    wall_clock = finished_at(run_to_end(train_cmd(fault_run_args(tiny_data, run)))) - began
    g = goodput.of_run(run)
    s = g.seconds
    assert [a.ended for a in g.attempts] == ["finished"]
    assert s["recomputed"] == s["hang"] == s["restart"] == s["queued"] == 0
    assert s["evaluation"] == pytest.approx(sum(r["eval_s"] for r in read_metrics(run)))
    assert s["other"] < 0.05 * g.total_s  # the shutdown after the last checkpoint
    assert g.ratio == pytest.approx(1 - (s["startup"] + s["evaluation"] + s["checkpoint"] + s["other"]) / g.total_s)
    assert g.total_s == pytest.approx(wall_clock, rel=0.01)
    print(goodput.report(g))
    print(f"wall clock: measured {wall_clock:.1f} s, accounted {g.total_s:.1f} s")
