"""Training under a real SLURM: slurm/local_cluster.sh runs a controller, accounting and two
nodes (n1, n2) on this machine; jobs train on CPU with gloo on the mini data at 32 px.

The sbatch scripts and launch.submit train to completion; a job signalled before its time limit
or preempted writes a checkpoint at the current step, is requeued, resumes and ends with exactly
the weights of an uninterrupted run, every step trained once.
"""

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import (
    PYTHON,
    REPO,
    assert_same_weights,
    read_jsonl,
    subprocess_env,
    tiny_overrides,
    wait_until,
)
from probes.fault_launch import paced

submitit = pytest.importorskip("submitit")  # the launcher's extra; a GPU box may lack it

SINGLE_NODE = REPO / "slurm" / "train_single_node.sbatch"
MULTI_NODE = REPO / "slurm" / "train_multi_node.sbatch"
STEPS = 10  # per epoch: 60 images, global batch 6
# Jobs that are signalled or killed mid-run: rank 0 waits 0.3 s more for each batch. The test model's steps
# take milliseconds, and a signal or kill sent once a step is in the log must still find the job mid-epoch
# (SLURM delivers a signal through the batch shell).
PACED = paced(0.3)
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

slurm = pytest.mark.slurm


def train_args(data: Path, run_dir: Path) -> list[str]:
    # data.workers=2: the signals SLURM sends reach the DataLoader worker processes too, as with the
    # shipped default (4); they must not take the checkpoint down with them.
    return tiny_overrides(data, run_dir, **{"train.batch_size": 6, "optim.lr": 0.01, "data.workers": 2})


# --- submitting and waiting on jobs ---------------------------------------------------------------

SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs():
    """A failed test must not leave its job holding a node for the next one."""
    first = len(SUBMITTED)
    yield
    if SUBMITTED[first:]:
        subprocess.run(["scancel", *SUBMITTED[first:]], capture_output=True, timeout=60)


def sacct(job_id: str, field: str = "State", steps: bool = False) -> list[str]:
    cmd = ["sacct", "-n", "-P", "-j", job_id, "-o", field] + ([] if steps else ["-X"])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()


def wait_or_fail(condition, timeout_s: float, what: str, log: Path | None = None, job_id: str | None = None):
    """wait_until `condition`, else cancel the job and fail with the log's tail."""
    if wait_until(condition, timeout_s):
        return
    if job_id:
        subprocess.run(["scancel", job_id], timeout=60)
    tail = log.read_text()[-4000:] if log and log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}; log {log}:\n{tail}")


def wait_for_text(path: Path, text: str, job_id: str, timeout_s: float = 180) -> None:
    wait_or_fail(lambda: path.exists() and text in path.read_text(), timeout_s, repr(text), path, job_id)


def wait_job_done(job_id: str, log: Path, timeout_s: float = 300) -> str:
    wait_or_fail(
        lambda: any(s.startswith(DONE_STATES) for s in sacct(job_id)), timeout_s, f"job {job_id} to end", log, job_id
    )
    return sacct(job_id)[0]


def sbatch(
    script: Path,
    run_dir: Path,
    data: Path,
    *flags: str,
    nproc: int = 2,
    overrides: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    paced: bool = True,
) -> tuple[str, Path]:
    log = run_dir.parent / f"{run_dir.name}.slurm.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--time=10",
        f"--output={log}",
        *flags,
        str(script),
        *train_args(data, run_dir),
        *overrides,
    ]
    full_env = subprocess_env(
        BFLY_PYTHON=PYTHON, BFLY_NPROC_PER_NODE=str(nproc), **{**(PACED if paced else {}), **(env or {})}
    )
    out = subprocess.run(cmd, cwd=run_dir.parent, env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    SUBMITTED.append(out.stdout.strip().split(";")[0])
    return SUBMITTED[-1], log


# --- what a finished run must look like ------------------------------------------------------------


def progress_steps(log: Path) -> list[tuple[int, int]]:
    """(epoch, step) of every progress line rank 0 printed, over all attempts of the job."""
    return [(int(e), int(s)) for e, s in re.findall(r"^epoch (\d+)/2 step (\d+)/\d+ ", log.read_text(), re.M)]


def assert_trained_every_step_once(run_dir: Path, log: Path) -> None:
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(0, STEPS), (1, 2 * STEPS)]
    assert progress_steps(log) == [(e, s) for e in (1, 2) for s in range(1, STEPS + 1)]


def assert_stopped_mid_epoch_and_resumed(text: str, signal_name: str, run_dir: Path) -> None:
    stop = re.search(rf"stopped by {signal_name}: checkpoint at epoch 1 step (\d+) written", text)
    assert stop, f"no mid-epoch stop by {signal_name} in:\n{text[-3000:]}"
    step = int(stop.group(1))
    assert 2 <= step < STEPS, step
    assert f"resumed from {run_dir}/last.pt: epoch 1, step {step} of the epoch, global step {step}" in text


# --- sbatch scripts --------------------------------------------------------------------------------


class Finished(NamedTuple):
    job_id: str
    run_dir: Path
    log: Path
    state: str


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_data, tmp_path_factory) -> Finished:
    """An uninterrupted 2-process run through the single-node script: what every other run must match."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", paced=False)
    return Finished(job_id, run_dir, log, wait_job_done(job_id, log))


@slurm
@pytest.mark.slow
def test_single_node_script_trains_two_processes_to_completion(reference):
    job_id, run_dir, log, state = reference
    assert state == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert f"bfly: job {job_id} attempt 1 on " in text and "2 trainer(s)" in text
    assert "2 process(es) on cpu" in text and "done: best valid top1" in text
    for name in ("config.yaml", "metrics.jsonl", "train.log", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    assert_trained_every_step_once(run_dir, log)


@slurm
@pytest.mark.parametrize("how", ["time limit (SIGUSR1 to the batch shell)", "preemption (scontrol requeue)"])
@pytest.mark.slow
def test_single_node_script_checkpoints_requeues_and_resumes(how, reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2")
    wait_for_text(log, f"epoch 1/2 step 2/{STEPS}", job_id)
    if how.startswith("time limit"):
        # What --signal=B:USR1@300 does 300 s before the limit.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=60)
        signal_name = "SIGUSR1"
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        signal_name = "SIGTERM"
    assert wait_job_done(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert f"bfly: job {job_id} attempt 2 " in text
    if signal_name == "SIGUSR1":
        assert f"requeueing job {job_id}" in text
    assert_stopped_mid_epoch_and_resumed(text, signal_name, run_dir)
    assert_trained_every_step_once(run_dir, log)
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")


@slurm
@pytest.mark.slow
def test_single_node_script_checkpoints_and_requeues_before_a_real_time_limit(slurm_cluster, tiny_data, tmp_path):
    """A 1-minute limit, SLURM's own signal 50 s before it, a run far longer than a minute (1000 epochs)."""
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--time=1",
        "--signal=B:USR1@50",
        f"--output={log}",
        str(SINGLE_NODE),
        *train_args(tiny_data, run_dir),
        "train.epochs=1000",
    ]
    env = subprocess_env(BFLY_PYTHON=PYTHON, BFLY_NPROC_PER_NODE="2")
    job_id = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    SUBMITTED.append(job_id)
    wait_for_text(log, f"resumed from {run_dir}/last.pt", job_id, timeout_s=240)
    subprocess.run(["scancel", job_id], timeout=60)
    text = log.read_text()
    assert "bfly: SIGUSR1 (time limit near)" in text and f"requeueing job {job_id}" in text
    assert f"bfly: job {job_id} attempt 2 " in text and "DUE TO TIME LIMIT" not in text
    stop = re.search(r"stopped by SIGUSR1: checkpoint at epoch (\d+) step (\d+) written", text)
    assert stop, text[-3000:]
    assert f"epoch {stop.group(1)}, step {stop.group(2)} of the epoch" in text


@slurm
@pytest.mark.slow
def test_multi_node_script_trains_one_process_on_each_of_two_nodes(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = sbatch(MULTI_NODE, run_dir, tiny_data, "--nodes=2", "--cpus-per-task=1", nproc=1)
    assert wait_job_done(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    # n1 is not a resolvable hostname here: the rendezvous address came from `scontrol show node`.
    assert "2 node(s) x 1 trainer(s), rendezvous 127.0.0.1:" in text and "(n1)" in text
    assert "2 process(es) on cpu" in text
    step_nodes = dict(zip(sacct(job_id, "JobID", steps=True), sacct(job_id, "NodeList", steps=True)))
    assert step_nodes[f"{job_id}.0"] == "n[1-2]"  # the torchrun step ran on both nodes
    assert_trained_every_step_once(run_dir, log)
    assert_same_weights(
        run_dir / "last.pt", reference.run_dir / "last.pt"
    )  # 2 nodes x 1 process computes what 1 node x 2 does


def run_script_as_slurm_would(script: Path, **env: str) -> subprocess.CompletedProcess:
    """The script started the way slurmd starts a batch script, with the given job environment."""
    full = subprocess_env(BFLY_PYTHON=PYTHON, **env)
    for name in [n for n in full if n.startswith("SLURM_") and n not in env]:
        del full[name]
    return subprocess.run(["bash", str(script), "train.epochs=1"], env=full, capture_output=True, text=True, timeout=60)


@slurm
@pytest.mark.slow
def test_multi_node_script_names_a_stalled_rank_and_ends_the_job(slurm_cluster, tiny_data, tmp_path):
    """2 nodes x 1 trainer; the trainer on the second node stops getting data at step 4 (BFLY_TEST_STALL):
    the job ends with the stalled rank named and both ranks' stacks written, within the limit + 60 s."""
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm.out"
    args = [*train_args(tiny_data, run_dir), "run.hang_timeout_s=5", "run.startup_timeout_s=60"]
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--time=10", "--nodes=2", "--cpus-per-task=1"]
    # No torchrun restart and no requeue: the job ends with the hang (the retries have trials of their own).
    env = subprocess_env(
        BFLY_PYTHON=PYTHON,
        BFLY_NPROC_PER_NODE="1",
        BFLY_TEST_STALL="1:data:4:600",
        BFLY_MAX_RESTARTS="0",
        BFLY_MAX_FAILURES="0",
    )
    job_id = subprocess.run(
        [*cmd, f"--output={log}", str(MULTI_NODE), *args], env=env, capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout.strip()  # fmt: skip
    SUBMITTED.append(job_id)
    wait_for_text(log, f"epoch 1/2 step 4/{STEPS}", job_id)
    stalled = time.monotonic()
    state = wait_job_done(job_id, log)
    took = time.monotonic() - stalled
    text = log.read_text()
    assert state == "FAILED", text[-3000:]
    hang = re.search(r"\]: (hang: .*)$", text, re.M)
    assert hang and re.search(r"stalled: rank 1 \(\S+, pid \d+\), waiting for data", hang[1]), text[-3000:]
    assert re.search(r"exitcode\s+: 76", text), text[-3000:]
    assert sorted(p.name.split("-")[0] for p in (run_dir / "hang").glob("rank*.txt")) == ["rank0", "rank1"]
    assert took < 5 * 10 + 60 + 30, took  # the step-time multiple, the grace, torchrun's own wait
    print(f"SLURM, 2 nodes: rank 1 stalled in its data path, job {state} {took:.0f} s later; {hang[1]}")


@slurm
def test_multi_node_script_fails_at_once_when_the_first_node_has_no_address(slurm_cluster):
    out = run_script_as_slurm_would(
        MULTI_NODE,
        SLURM_JOB_ID="123",
        SLURM_JOB_NODELIST="gpu-[07-08]",
        SLURM_JOB_NUM_NODES="2",
        BFLY_NPROC_PER_NODE="1",
    )
    assert out.returncode == 1
    assert "cannot resolve the first node gpu-07" in out.stderr and "scontrol show node gpu-07" in out.stderr


@pytest.mark.parametrize("script", [SINGLE_NODE, MULTI_NODE], ids=["single", "multi"])
def test_scripts_refuse_to_start_without_gpus_or_a_process_count(script):
    out = run_script_as_slurm_would(script, SLURM_JOB_ID="5", SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1")
    assert out.returncode == 1
    assert "no trainers to start: ask for GPUs (--gpus-per-node=G) or set BFLY_NPROC_PER_NODE" in out.stderr


@pytest.mark.parametrize("script", [SINGLE_NODE, MULTI_NODE], ids=["single", "multi"])
def test_a_time_limit_signal_before_training_does_not_end_the_script(script, tiny_data, tmp_path):
    """SLURM's SIGUSR1 to the batch shell (--signal=B:USR1) while the script still prepares, here during its
    preflight: the shell lives on, says the time limit is near and passes the signal on to the job's steps.
    (scancel, srun and scontrol are stand-ins that log their arguments and fail: no cluster is touched.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scancel", "srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path / "calls"}\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    env = subprocess_env(BFLY_PYTHON=PYTHON, BFLY_CHECK="1", BFLY_NPROC_PER_NODE="2", SLURM_JOB_ID="7")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_JOB_ID"}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    cmd = ["bash", str(script), *tiny_overrides(tiny_data, tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = [proc.stdout.readline()]
    while lines[-1] and not lines[-1].startswith("bfly: preflight before training"):
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, out, err)  # the stand-in srun or scontrol failed: not the signal
    assert "bfly: SIGUSR1 (time limit near): trainers checkpoint, then job 7 requeues" in out, out
    assert "scancel --quiet --signal=USR1 7" in (tmp_path / "calls").read_text()


# --- failures: restarts inside the job, requeues, the retry budget ------------------------------------

# last.pt every 2 steps: a failure loses at most 2 steps (checkpoint cadence does not change the weights).
EVERY_2 = ("train.checkpoint_every_steps=2",)


def trainer_pid(job_id: str, rank: int, timeout_s: float = 120) -> int:
    """The pid of the trainer of `rank` in a running job (found through /proc: every node of the local
    cluster is this machine). Its loader workers share its environment; they are its children."""

    def environ(pid: str) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return {}
        return dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)

    def parent(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            return ""

    def rank_of(pid: str) -> str | None:
        env = environ(pid)
        if env.get("SLURM_JOB_ID") != job_id:
            return None
        if "TORCHELASTIC_RUN_ID" in env:  # a torchrun worker (the sbatch scripts)
            return env.get("RANK")
        with contextlib.suppress(OSError):
            if b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes():  # a submitit task
                return env.get("SLURM_PROCID")
        return None

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        matches = [pid for pid in filter(str.isdigit, os.listdir("/proc")) if rank_of(pid) == str(rank)]
        trainers = [pid for pid in matches if parent(pid) not in matches]
        if len(trainers) == 1:
            return int(trainers[0])
        time.sleep(0.2)
    pytest.fail(f"no trainer of rank {rank} found in job {job_id}")


def kill_trainer_after(log: Path, job_id: str, step_line: str, rank: int = 1) -> float:
    """SIGKILL the trainer of `rank` once `step_line` is in the job's log; returns the time of the kill."""
    wait_for_text(log, step_line, job_id)
    os.kill(trainer_pid(job_id, rank), signal.SIGKILL)
    return time.monotonic()


def seconds_to_training_again(log: Path, killed_at: float, after: str, job_id: str) -> float:
    """From the kill to the first progress line printed after `after` (a line of the restarted attempt)."""

    def trained_again() -> bool:
        text = log.read_text()
        return after in text and re.search(r"^epoch \d+/2 step \d+/", text.split(after, 1)[1], re.M) is not None

    wait_or_fail(trained_again, 300, "training again", log, job_id)
    return time.monotonic() - killed_at


@slurm
@pytest.mark.slow
def test_a_killed_trainer_is_restarted_inside_the_job_and_the_weights_are_exact(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", overrides=EVERY_2)
    killed_at = kill_trainer_after(log, job_id, f"epoch 1/2 step 5/{STEPS}")
    lost = seconds_to_training_again(log, killed_at, "restart 1 of 2 inside this job", job_id)
    assert wait_job_done(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert f"bfly: job {job_id} attempt 2" not in text  # no requeue: torchrun restarted the trainers
    assert re.search(
        r"restart 1 of 2 inside this job \(torchrun --max-restarts\) after: status 1 on rank 0 \(\S+\)$", text, re.M
    )
    resumed = re.search(rf"resumed from {run_dir}/last.pt: epoch 1, step (\d+) of the epoch", text)
    assert resumed and int(resumed[1]) >= 2, text[-3000:]
    assert "restart 1 of 2 inside this job" in (run_dir / "train.log").read_text()
    assert [(r["epoch"], r["step"]) for r in read_jsonl(run_dir / "metrics.jsonl")] == [(0, STEPS), (1, 2 * STEPS)]
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")
    print(
        f"SIGKILL of rank 1 after step 5: restarted inside the job from step {resumed[1]}, training again {lost:.1f}s after the kill"
    )


@slurm
@pytest.mark.slow
def test_a_job_whose_trainers_crashed_requeues_and_resumes_exactly(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    no_restarts = {"BFLY_MAX_RESTARTS": "0"}
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", overrides=EVERY_2, env=no_restarts)
    killed_at = kill_trainer_after(log, job_id, f"epoch 1/2 step 5/{STEPS}")
    lost = seconds_to_training_again(log, killed_at, f"bfly: job {job_id} attempt 2", job_id)
    assert wait_job_done(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    why = re.search(
        r"^bfly: crash \(status 1\): requeueing, failure 1 of 3; it resumes from checkpoint at step (\d+) \[status 1 on rank 0 \(\S+\)\]$",
        text,
        re.M,
    )
    assert why and int(why[1]) >= 4, text[-3000:]
    assert f"resumed from {run_dir}/last.pt: epoch 1, step {why[1]} of the epoch" in text
    assert f"bfly: job {job_id} attempt 2: 1 failure requeue(s) of BFLY_MAX_FAILURES=3" in text
    train_log = (run_dir / "train.log").read_text()
    assert f"job {job_id} attempt 1 failed: crash (status 1): requeueing, failure 1 of 3" in train_log
    assert [(r["epoch"], r["step"]) for r in read_jsonl(run_dir / "metrics.jsonl")] == [(0, STEPS), (1, 2 * STEPS)]
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")
    print(f"crash after step 5, requeued, resumed from step {why[1]}: training again {lost:.1f}s after the kill")


@slurm
@pytest.mark.parametrize("retried", ["with progress", "without progress"])
@pytest.mark.slow
def test_a_crash_on_every_attempt_stops_with_one_line_saying_why(retried, slurm_cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {"BFLY_MAX_RESTARTS": "0", "BFLY_MAX_FAILURES": "1" if retried == "with progress" else "3"}
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", overrides=EVERY_2, env=env)
    kill_trainer_after(log, job_id, f"epoch 1/2 step 5/{STEPS}")
    # The second attempt resumes from step 4: killed after step 7 it has written step 6; at its
    # resume line, before any new step, it has not.
    second = f"bfly: job {job_id} attempt 2"
    wait_for_text(log, second, job_id)
    at = f"epoch 1/2 step 7/{STEPS}" if retried == "with progress" else "resumed from"
    wait_or_fail(lambda: at in log.read_text().split(second, 1)[1], 300, at, log, job_id)
    os.kill(trainer_pid(job_id, 1), signal.SIGKILL)
    assert wait_job_done(job_id, log) == "FAILED", log.read_text()[-3000:]
    assert sacct(job_id, "ExitCode") == ["1:0"]
    text = log.read_text()
    assert f"bfly: job {job_id} attempt 3" not in text
    if retried == "with progress":
        why = "bfly: crash (status 1): not requeueing, 1 failure(s) requeued already (BFLY_MAX_FAILURES=1)"
    else:
        why = "bfly: crash (status 1): not requeueing, no progress since the last retry (still at step 4)"
    assert why in text, text[-3000:]
    assert why.removeprefix("bfly: ") in (run_dir / "train.log").read_text()


@slurm
def test_a_config_error_ends_the_job_at_once_without_a_retry(slurm_cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", overrides=("train.epochs=zero",))
    assert wait_job_done(job_id, log) == "FAILED", log.read_text()[-3000:]
    assert sacct(job_id, "ExitCode") == ["2:0"]
    text = log.read_text()
    assert "bfly: error: " in text and "train.epochs" in text and "not training, not requeueing" in text
    assert "torch.distributed.run" not in text and f"bfly: job {job_id} attempt 2" not in text
    assert not run_dir.exists()


# --- launch.submit (submitit) ----------------------------------------------------------------------


def launch_submit(
    run_dir: Path, data: Path, *flags: str, timeout: float = 120, overrides: tuple[str, ...] = (), paced: bool = False
) -> subprocess.CompletedProcess:
    cmd = [
        PYTHON,
        "-m",
        "launch.submit",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        *flags,
        *train_args(data, run_dir),
        *overrides,
    ]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(**(PACED if paced else {}))
    out = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def submitted_job(out: subprocess.CompletedProcess, run_dir: Path) -> submitit.SlurmJob:
    match = re.search(r"^submitted job (\d+): ", out.stdout, re.M)
    assert match, out.stdout
    job_id = match.group(1)
    SUBMITTED.append(job_id)
    assert f"task logs:     {run_dir}/submitit/{job_id}_0_log.out" in out.stdout
    assert f"sacct -j {job_id}" in out.stdout
    return submitit.SlurmJob(run_dir / "submitit", job_id, tasks=[0, 1])


def job_results(job, timeout_s: float = 300) -> list:
    log = job.paths.folder / f"{job.job_id}_0_log.out"
    wait_or_fail(lambda: job.done(force_check=True), timeout_s, f"submitit job {job.job_id}", log, job.job_id)
    return job.results()


@pytest.fixture(scope="module")
def submitted_run(slurm_cluster, tiny_data, tmp_path_factory):
    """`python -m launch.submit` with 2 tasks, uninterrupted; its results read back with submitit."""
    run_dir = tmp_path_factory.mktemp("submitit") / "run"
    out = launch_submit(run_dir, tiny_data, "--time", "10")
    job = submitted_job(out, run_dir)
    return job, run_dir, job_results(job)


@slurm
def test_launch_submit_trains_with_two_tasks_and_the_results_read_back(submitted_run, reference):
    job, run_dir, results = submitted_run
    assert len(results) == 2 and results[1] is None  # rank 0 reports for the run
    assert results[0]["run_dir"] == str(run_dir) and results[0]["epochs_done"] == 2
    assert results[0]["last_epoch"] == read_jsonl(run_dir / "metrics.jsonl")[-1]
    log = job.paths.folder / f"{job.job_id}_0_log.out"
    assert "2 process(es) on cpu" in log.read_text()
    assert_trained_every_step_once(run_dir, log)
    assert_same_weights(
        run_dir / "last.pt", reference.run_dir / "last.pt"
    )  # one task per process computes what torchrun does


@slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["timeout", "preemption", "scontrol requeue"])
def test_launch_submit_job_checkpoints_requeues_and_resumes(how, reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # submitit counts a signal as a time-out unless the job ran under 80% of a limit of 50 min or more.
    out = launch_submit(run_dir, tiny_data, "--time", "10" if how == "timeout" else "60", paced=True)
    job = submitted_job(out, run_dir)
    log = run_dir / "submitit" / f"{job.job_id}_0_log.out"
    wait_for_text(log, f"epoch 1/2 step 2/{STEPS}", job.job_id)
    if how == "scontrol requeue":  # SLURM requeues by itself: SIGTERM, then the original job again
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=60)
    else:
        job._interrupt(timeout=how == "timeout")  # submitit's own simulation: USR2, after SIGTERM for preemption
    results = job_results(job)
    assert results[0]["epochs_done"] == 2
    text = log.read_text()
    if how == "timeout":
        assert "this job is timed-out" in text and f"Requeued job {job.job_id} (49 remaining timeouts)" in text
    elif how == "preemption":
        assert "this job is preempted" in text and f"Requeued job {job.job_id} (50 remaining timeouts)" in text
    else:
        assert "not requeueing here" in text and "Requeued job" not in text
    # Preemption: SIGTERM then SIGUSR2; the trainer may stop on either, submitit requeues on SIGUSR2.
    stop_signal = {"timeout": "SIGUSR2", "preemption": "(?:SIGTERM|SIGUSR2)", "scontrol requeue": "SIGTERM"}[how]
    assert_stopped_mid_epoch_and_resumed(text, stop_signal, run_dir)
    assert_trained_every_step_once(run_dir, log)
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")


@slurm
@pytest.mark.slow
def test_launch_submit_job_requeues_after_a_crash_and_resumes_exactly(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    out = launch_submit(run_dir, tiny_data, "--time", "10", overrides=EVERY_2, paced=True)
    job = submitted_job(out, run_dir)
    log = run_dir / "submitit" / f"{job.job_id}_0_log.out"
    killed_at = kill_trainer_after(log, job.job_id, f"epoch 1/2 step 5/{STEPS}")
    lost = seconds_to_training_again(log, killed_at, f"bfly launch: job {job.job_id} attempt 2", job.job_id)
    results = job_results(job)
    assert results[0]["epochs_done"] == 2
    text = log.read_text()
    why = re.search(
        r"bfly launch: rank 0: crash \(status 1\): requeueing, failure 1 of 3; it resumes from checkpoint at step (\d+)",
        text,
    )
    assert why and f"bfly launch: requeued job {job.job_id}" in text, text[-3000:]
    assert f"resumed from {run_dir}/last.pt: epoch 1, step {why[1]} of the epoch" in text
    assert [(r["epoch"], r["step"]) for r in read_jsonl(run_dir / "metrics.jsonl")] == [(0, STEPS), (1, 2 * STEPS)]
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")
    print(
        f"submitit task killed after step 5: requeued, resumed from step {why[1]}, training again {lost:.1f}s after the kill"
    )


# --- without SLURM ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_local_runs_the_same_job_on_this_machine(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    out = launch_submit(run_dir, tiny_data, "--cluster", "local", "--time", "10", timeout=300)
    assert re.search(rf"job \d+ \(run\) done: 2 epoch\(s\), valid top1 [\d.]+%; run directory {run_dir}", out.stdout)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]
