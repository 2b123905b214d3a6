"""Fault injection on real processes, with real signals and real files (CPU, gloo).

A killed process, a preempted job or a broken checkpoint costs at most the work since the last
checkpoint and ends with a clear message. Training on CPU is deterministic, so "nothing lost" is
checked strictly: the final weights of a run that met a fault are bit-identical to those of an
uninterrupted run of the same config, and its metrics.jsonl holds each epoch once.

Default tier: one trial of each fault. Slow tier (`pytest -m slow tests/test_faults.py`): SIGKILL at
five more kill points, a SIGKILL during a DDP checkpoint write, SIGUSR1 to one rank only, SIGTERM
to the torchrun agent, and the rank-local error raised inside a DataLoader worker.

The config (probes/fault_launch.FAULT): tiny data, 5 steps per epoch, 2 epochs, last.pt every 2
steps and at each epoch's end.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bfly.core import checkpoint as ckpt
from bfly.core.data.sampling import StepPlan, rank_micro_batches
from bfly.job.exits import EXIT_STOPPED
from bfly.job.train import main

from conftest import (
    PYTHON,
    REPO,
    TEST_MODEL,
    assert_same_weights,
    data_copy,
    our_frames,
    read_jsonl,
    subprocess_env,
    tiny_overrides,
)
from probes.fault_launch import (
    CKPT_EVERY,
    STEPS,
    Launch,
    fault_args,
    replace_image,
    run_to_end,
    torchrun_cmd,
    train_cmd,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")


def assert_nothing_lost(run: Path, ref: Path) -> None:
    assert_same_weights(run / ckpt.LAST, ref / ckpt.LAST)
    got, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]  # each epoch once, none lost
    for g, w in zip(got, want):
        for key in ("step", "lr", "valid_loss", "valid_top1", "valid_top5"):
            assert g[key] == w[key], key
        # A resumed epoch adds its saved loss sum to the rest in another order.
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-9)


def resumed_step(launch: Launch, source: Path) -> int:
    return int(launch.wait_for(rf"^resumed from {re.escape(str(source))}: .* global step (\d+)$")[1])


# --- 1. SIGKILL one rank of a torchrun --max-restarts job -------------------------------------------


def sigkill_one_rank(data: Path, run: Path, ref: Path, step: int, rank: int) -> None:
    """Kill point: rank 0's progress line of `step` (a step's line precedes its checkpoint)."""
    t0 = time.monotonic()
    launch = Launch(torchrun_cmd(2, fault_args(data, run), max_restarts=2), timeout=480)
    seen = launch.wait_step(step)
    os.kill(launch.workers(2)[rank], signal.SIGKILL)
    assert launch.wait() == 0, launch.output[-4000:]
    assert launch.output.count(f"bfly: {TEST_MODEL},") == 2  # started once, restarted once
    resumed = re.search(rf"^resumed from {re.escape(str(run / ckpt.LAST))}: .* global step (\d+)$", launch.output, re.M)
    restart = int(resumed[1]) if resumed else 0  # killed before the first checkpoint: starts afresh
    assert seen - CKPT_EVERY <= restart < STEPS, f"killed after step {seen}, restarted from step {restart}"
    assert_nothing_lost(run, ref)
    print(
        f"SIGKILL rank {rank} after step {seen}: restarted from step {restart}, "
        f"finished bit-identical in {time.monotonic() - t0:.0f}s"
    )


@pytest.mark.slow
def test_sigkill_of_one_rank_restarts_from_the_last_checkpoint_and_loses_nothing(tiny_data, tmp_path, ref2):
    sigkill_one_rank(tiny_data, tmp_path / "run", ref2, step=3, rank=1)


# Five more kill points (global step, rank), drawn once with a fixed seed so failures reproduce.
KILL_POINTS = [(s, i % 2) for i, s in enumerate(random.Random(7).sample([2, 4, 5, 6, 7, 8, 9], 5))]


@pytest.mark.slow
@pytest.mark.parametrize("step,rank", KILL_POINTS, ids=[f"step{s}-rank{r}" for s, r in KILL_POINTS])
def test_sigkill_at_random_points(tiny_data, tmp_path, ref2, step, rank):
    sigkill_one_rank(tiny_data, tmp_path / "run", ref2, step, rank)


# --- 2. SIGKILL during a checkpoint write; corrupt checkpoints ---------------------------------------


def paused_write(run: Path) -> dict[str, str]:
    """The environment that pauses the second last.pt write of a run half-way (bfly.job.faults)."""
    return {"BFLY_TEST_PAUSE_CHECKPOINT": str(run.parent / "paused")}


def kill_during_next_write(launch: Launch, run: Path, pid: int) -> None:
    """SIGKILL `pid` while the writer of the run's second last.pt is paused half-way (paused_write)."""
    paused = run.parent / "paused"
    while not paused.exists():  # the writer waits there until it is killed: no race
        if launch.proc.poll() is not None or time.monotonic() > launch.deadline:
            launch.fail("no second checkpoint written")
        time.sleep(0.05)
    assert paused.read_text() == str(run / f".{ckpt.LAST}.tmp")
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    launch = Launch(train_cmd(fault_args(tiny_data, run)), timeout=300, env=paused_write(run))
    kill_during_next_write(launch, run, launch.proc.pid)
    assert launch.wait(30) == -signal.SIGKILL
    tmp = run / f".{ckpt.LAST}.tmp"
    assert tmp.exists(), "the kill came after the rename: no write was interrupted"
    partial = tmp.stat().st_size < (run / ckpt.LAST).stat().st_size
    warnings = []
    saved, source = ckpt.load_resumable(run, warnings.append)  # the previous checkpoint loads
    assert (source, warnings) == (run / ckpt.LAST, [])  # killed before the renames: last.pt untouched
    resumed = run_to_end(train_cmd(fault_args(tiny_data, run)))
    assert resumed_step(resumed, source) == saved["global_step"]
    assert_nothing_lost(run, ref1)
    print(
        f"killed while writing ({'partial temp file' if partial else 'temp file complete, not renamed'}); "
        f"resumed from step {saved['global_step']}"
    )


@pytest.mark.slow
def test_sigkill_of_rank_0_during_a_ddp_checkpoint_write(tiny_data, tmp_path, ref2):
    run = tmp_path / "run"
    launch = Launch(torchrun_cmd(2, fault_args(tiny_data, run), max_restarts=2), timeout=480, env=paused_write(run))
    kill_during_next_write(launch, run, launch.workers(2)[0])
    assert launch.wait() == 0, launch.output[-4000:]
    assert launch.output.count("resumed from") == 1
    assert_nothing_lost(run, ref2)


def flip_bytes(path: Path) -> None:
    """64 random bytes in the middle: the zip structure stays valid, one tensor's bytes do not."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(64))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated": truncate,
    "flipped bytes": flip_bytes,
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("not a checkpoint\n"),
    "damaged header": lambda p: p.write_bytes(b"\x00" * 64 + p.read_bytes()[64:]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_last_checkpoint_is_reported_and_the_previous_one_used(ref1, tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    for name in (ckpt.LAST, ckpt.PREV):
        (run / name).write_bytes((ref1 / name).read_bytes())
    DAMAGE[damage](run / ckpt.LAST)
    warnings = []
    saved, source = ckpt.load_resumable(run, warnings.append)
    assert source == run / ckpt.PREV
    assert len(warnings) == 1 and warnings[0].startswith(f"{run / ckpt.LAST}: truncated or corrupt checkpoint")
    assert f"falling back to the previous checkpoint {run / ckpt.PREV}" in warnings[0]
    assert saved["global_step"] == torch.load(ref1 / ckpt.PREV, weights_only=True)["global_step"]
    (run / ckpt.PREV).unlink()  # no fallback left: the error itself, naming the file
    with pytest.raises(ckpt.CheckpointError, match=f"^{re.escape(str(run / ckpt.LAST))}: truncated or corrupt"):
        ckpt.load_resumable(run, warnings.append)


def test_a_run_killed_between_the_two_renames_resumes_from_the_previous_checkpoint(ref1, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.PREV).write_bytes((ref1 / ckpt.LAST).read_bytes())  # last.pt renamed away, new one not yet in
    warnings = []
    saved, source = ckpt.load_resumable(run, warnings.append)
    assert source == run / ckpt.PREV and saved["global_step"] == STEPS
    assert warnings == [f"{run / ckpt.LAST} missing; resuming from {run / ckpt.PREV}"]


@pytest.mark.slow
def test_a_corrupt_last_checkpoint_is_not_resumed_silently(tiny_data, tmp_path, ref1):
    """Flipped bytes inside a tensor: torch.load alone would return wrong weights without a word."""
    run = tmp_path / "run"
    run_to_end(train_cmd(fault_args(tiny_data, run, **{"run.stop_after_steps": 3})))
    # last.pt every 2 steps, then at the stop: last.pt holds step 3, last.prev.pt step 2.
    assert torch.load(run / ckpt.PREV, weights_only=True)["global_step"] == 2
    flip_bytes(run / ckpt.LAST)
    resumed = run_to_end(train_cmd(fault_args(tiny_data, run)))
    warning = resumed.wait_for(r"^warning: ").string
    assert warning.startswith(f"warning: {run / ckpt.LAST}: truncated or corrupt checkpoint (CRC-32 mismatch")
    assert resumed_step(resumed, run / ckpt.PREV) == 2
    assert_nothing_lost(run, ref1)


# --- 3. SIGTERM / SIGUSR1: checkpoint at the current step, exit 75, resume mid-epoch -------------------


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_resume_continues_mid_epoch(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    launch = Launch(train_cmd(fault_args(tiny_data, run)), timeout=300)
    launch.wait_step(1)
    sent = time.monotonic()
    os.kill(launch.proc.pid, signal.SIGTERM)
    assert launch.wait(60) == EXIT_STOPPED
    took = time.monotonic() - sent
    step = int(launch.wait_for(r"^stopped by SIGTERM: checkpoint at epoch 1 step (\d+) written to")[1])
    assert 1 <= step < 5 and took < 20, (step, took)
    saved = torch.load(run / ckpt.LAST, weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, step, step)
    resumed = run_to_end(train_cmd(fault_args(tiny_data, run)))
    assert f"resumed from {run / ckpt.LAST}: epoch 1, step {step} of the epoch, global step {step}" in resumed.output
    assert_nothing_lost(run, ref1)  # the sampler went on from `step`, not from the epoch's start
    print(f"SIGTERM: checkpoint at step {step}, exit {EXIT_STOPPED} {took:.1f}s after the signal")


def ddp_signal_and_resume(data: Path, run: Path, ref: Path, sig: int, targets: str, log_every: int) -> None:
    """`targets`: "workers" (as SLURM signals every task), "rank1" (one rank only) or "agent" (torchrun)."""
    launch = Launch(torchrun_cmd(2, fault_args(data, run, **{"train.log_every": log_every})), timeout=300)
    launch.wait_step(1)
    workers = launch.workers(2)
    pids = {"workers": list(workers.values()), "rank1": [workers[1]], "agent": [launch.proc.pid]}[targets]
    sent = time.monotonic()
    for pid in pids:
        os.kill(pid, sig)
    rc = launch.wait(90)
    took = time.monotonic() - sent
    # Workers stopped by a signal exit 75; torchrun reports that as a failure of its own (exit 1). When
    # torchrun itself was signalled it exits through its SignalException instead.
    assert rc != 0, launch.output[-4000:]
    if targets != "agent":
        assert torchrun_exit_codes(launch.output) == dict.fromkeys(range(2), EXIT_STOPPED), launch.output[-4000:]
    name = signal.Signals(sig).name
    m = launch.wait_for(rf"^stopped by ({name}|a signal on another rank): checkpoint at epoch 1 step (\d+) written")
    step = int(m[2])
    assert 1 <= step < 5 and step % log_every == 0 and took < 30, (step, took)  # ranks agree at log points
    assert "collective failed" not in launch.output
    # No trainer's traceback; torchrun shows its own (SignalException or ChildFailedError).
    assert not our_frames(launch.output), launch.output[-4000:]
    saved = torch.load(run / ckpt.LAST, weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, step)
    resumed = run_to_end(torchrun_cmd(2, fault_args(data, run)))
    assert f"resumed from {run / ckpt.LAST}: epoch 1, step {step} of the epoch" in resumed.output
    assert_nothing_lost(run, ref)
    print(f"{name} to {targets}: checkpoint at step {step}, all exited {took:.1f}s after the signal")


@pytest.mark.slow
def test_sigusr1_to_every_worker_stops_a_ddp_run_at_the_same_step(tiny_data, tmp_path, ref2):
    ddp_signal_and_resume(tiny_data, tmp_path / "run", ref2, signal.SIGUSR1, "workers", log_every=1)


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_at_the_next_log_point(tiny_data, tmp_path, ref2):
    ddp_signal_and_resume(tiny_data, tmp_path / "run", ref2, signal.SIGUSR1, "rank1", log_every=2)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_checkpoints_before_the_workers_exit(tiny_data, tmp_path, ref2):
    ddp_signal_and_resume(tiny_data, tmp_path / "run", ref2, signal.SIGTERM, "agent", log_every=1)


# --- 4. An exception on one rank ----------------------------------------------------------------------


def break_an_image_only_rank_1_reads(data: Path, at_step: int) -> Path:
    plan = StepPlan.make(12, 2, 0)
    batches = list(rank_micro_batches(60, plan, rank=1, seed=0, epoch=0))
    index = batches[at_step][0].index
    return replace_image(data, "train", index, "rank1-only.jpg", b"this is text, not a JPEG\n")


def torchrun_exit_codes(out: str) -> dict[int, int]:
    """rank -> exit code, from the failure summary torchrun prints."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)", out)
    return {int(rank): int(code) for rank, code in found}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_on_one_rank_stops_every_rank_with_the_error_printed_once(tiny_data, tmp_path, workers):
    bad = break_an_image_only_rank_1_reads(data_copy(tiny_data, tmp_path / "data"), at_step=2)
    launch = Launch(
        torchrun_cmd(2, tiny_overrides(tmp_path / "data", tmp_path / "run", **{"data.workers": workers})), timeout=300
    )
    launch.wait_for(re.escape(str(bad)))
    printed = time.monotonic()
    assert launch.wait(90) != 0
    took = time.monotonic() - printed
    out = launch.output
    # Counted in torchrun's whole output (workers' stdout and stderr, the agent's failure summary): the
    # path appears in rank 1's line and in the summary, which shows that line as the root cause.
    error = f"bfly.train: error [rank 1]: {bad}: not an image Pillow can read; run `python -m bfly.train --check`"
    assert out.count(str(bad)) == 2 and out.count(error) == 2, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("bfly.train: error")]
    assert len(errors) == 1 and errors[0].startswith(error)
    # Rank 0, waiting in a collective for rank 1, stops with a short line (exit code 1, or the
    # SIGTERM torchrun sends it, whichever torchrun sees first).
    assert re.search(r"^bfly\.train \[rank 0\]: stopping: rank 1 failed \(see its error\)$", out, re.M), out[-4000:]
    codes = torchrun_exit_codes(out)
    assert codes[1] == 2 and codes[0] != 0, codes
    assert out.count("Traceback (most recent call last)") == 1, out[
        -6000:
    ]  # torchrun's own ChildFailedError, no worker's
    assert took < 60
    print(f"every rank exited {took:.1f}s after the error")


# --- 5. A run directory that cannot hold checkpoints --------------------------------------------------


def test_a_run_directory_that_cannot_be_created_fails_at_start_up(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.monotonic()
    assert main(tiny_overrides(tiny_data, blocker / "run")) == 2
    err = capsys.readouterr().err
    assert err == f"bfly.train: error: run directory {blocker / 'run'} is not writable: Not a directory\n"
    assert time.monotonic() - t0 < 10  # before any model is built


def unshare_cmd() -> list[str]:
    base = ["unshare", "--mount", "--propagation", "private"]
    return base if os.geteuid() == 0 else [*base, "--user", "--map-root-user"]


def run_with_private_mounts(probe: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs tests/probes/`probe` in a private mount namespace, where it mounts its own tmpfs; skips the
    test where that is not allowed. The probe must have exited 0."""
    cmd = [*unshare_cmd(), PYTHON, str(REPO / "tests/probes" / probe), *args]
    try:
        out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed")
    if "mount failed" in out.stdout or "unshare failed" in out.stderr or "Operation not permitted" in out.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stdout[-300:]}{out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_read_only_full_or_too_small_file_system_fails_at_start_up(tiny_data, tmp_path):
    """Real file systems: tmpfs mounts in a private mount namespace (the probe mounts them)."""
    out = run_with_private_mounts(
        "fault_disk.py", [str(tmp_path), *tiny_overrides(tiny_data, tmp_path / "unused")], timeout=120
    )
    results = {r["case"]: r for r in map(json.loads, out.stdout.splitlines())}
    expect = {
        "read-only": r" is not writable: Read-only file system",
        "full": r" is not writable: No space left on device",
        "too small": r": \d+ MiB free, checkpoints need about \d+ MiB",
    }
    for case, pattern in expect.items():
        r = results[case]
        assert r["rc"] == 2, r
        assert re.fullmatch(rf"bfly\.train: error: run directory {re.escape(r['run_dir'])}{pattern}\n", r["stderr"]), r
        assert r["stdout"] == "" and r["seconds"] < 10, r  # nothing trained, no model built
