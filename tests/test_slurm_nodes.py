"""Nodes under a real SLURM (slurm/local_cluster.sh: n1 and n2 on this machine): every job checks its
nodes before training; a node that differs is named and the job ends before step 1; a node blamed for a
hang is excluded from the requeued job, which runs on the other node and finishes."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from bfly.job import ledger
from test_slurm import (  # noqa: F401  (the fixtures: the reference run, and no job left behind by a failed test)
    EVERY_2,
    MULTI_NODE,
    SINGLE_NODE,
    STEPS,
    cancel_leftover_jobs,
    job_results,
    launch_submit,
    reference,
    sacct,
    sbatch,
    submitted_job,
    trainer_pid,
    wait_for_text,
    wait_job_done,
    wait_or_fail,
)

from conftest import assert_same_weights

slurm = pytest.mark.slurm
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def check_seconds(text: str) -> int:
    found = re.search(
        r"^bfly\.nodecheck: (?:nodes ok: \d+/\d+|\d+ of \d+ node\(s\) failed the check) in (\d+) s", text, re.M
    )
    assert found, text[-3000:]
    return int(found[1])


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


@slurm
@pytest.mark.slow
def test_a_clean_two_node_job_passes_the_node_check_and_trains(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log = sbatch(MULTI_NODE, run_dir, tiny_data, "--nodes=2", "--cpus-per-task=1", nproc=1)
    assert wait_job_done(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    ok = re.search(r"^bfly\.nodecheck: nodes ok: 2/2 in \d+ s; all-reduce 2x1 ranks \(gloo, 4 MiB\).*$", text, re.M)
    assert ok, text[-3000:]
    assert text.index(ok[0]) < text.index(f"epoch 1/2 step 1/{STEPS}")
    assert "done: best valid top1" in text and check_seconds(text) <= 60
    print(ok[0])


def faulty_data(tiny_data, tmp_path):
    copy = tmp_path / "stale-data"
    shutil.copytree(tiny_data, copy)
    next((copy / "train").rglob("*.jpg")).unlink()  # a partial copy: one image short
    return f"data={copy}", "n2: data root {copy} differs from n1's (metadata digest "


FAULTS = {
    "data differs": faulty_data,
    "run dir not shared": lambda data, tmp: (
        f"rundir={tmp / 'local'}",
        "n2: run directory {local} is not the one n1 sees",
    ),
    "versions differ": lambda data, tmp: ("version=torch@0.0.0", "n2: torch 0.0.0 differs from n1's "),
}


@slurm
@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_a_node_that_differs_ends_the_job_before_step_1_naming_it(fault, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    injected, line = FAULTS[fault](tiny_data, tmp_path)
    line = line.format(copy=tmp_path / "stale-data", local=tmp_path / "local")
    env = {"BFLY_TEST_NODE_FAULT": f"n2:{injected}"}
    start = time.monotonic()
    job_id, log = sbatch(MULTI_NODE, run_dir, tiny_data, "--nodes=2", "--cpus-per-task=1", nproc=1, env=env)
    assert wait_job_done(job_id, log) == "FAILED", log.read_text()[-3000:]
    took = time.monotonic() - start
    text = log.read_text()
    assert sacct(job_id, "ExitCode") == ["77:0"], text[-3000:]
    assert f"bfly.nodecheck: {line}" in text, text[-3000:]
    assert "bfly.nodecheck: 1 of 2 node(s) failed the check in " in text and "n2 recorded in" in text
    # Excluding n2 would leave one node for a two-node job: the job says so and ends.
    refused = re.search(r"^bfly: not excluding n2 \(it failed the node check: (.*)\): (.*)$", text, re.M)
    assert refused and line.split(": ", 1)[1] in refused[1], text[-3000:]
    assert refused[2] == "it would leave 1 usable node(s) in the partition, this job needs 2"
    assert "bfly: failed node check (status 77): not requeueing, no failing node can be excluded" in text
    assert f"bfly: job {job_id} attempt 2" not in text
    assert "epoch 1/2 step 1/" not in text and not (run_dir / "last.pt").exists()
    (blamed,) = ledger.read(run_dir)
    assert (blamed.node, blamed.reason, blamed.job) == ("n2", ledger.NODE_CHECK, job_id)
    assert check_seconds(text) <= 60
    said = [
        ln for ln in text.splitlines() if ln.startswith(("bfly.nodecheck: ", "bfly: not excluding", "bfly: failed"))
    ]
    print(f"{fault}: job {job_id} ended {took:.0f} s after sbatch, check {check_seconds(text)} s:", *said, sep="\n  ")


@slurm
@pytest.mark.slow
def test_a_hung_job_is_requeued_away_from_its_node_resumes_and_finishes(reference, tiny_data, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = (*EVERY_2, "run.hang_timeout_s=5", "run.startup_timeout_s=60", "run.stop_grace_s=10")
    env = {"BFLY_MAX_RESTARTS": "0"}  # the hang goes to the requeue, not to a torchrun restart
    job_id, log = sbatch(SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", overrides=overrides, env=env)
    wait_for_text(log, f"epoch 1/2 step 5/{STEPS}", job_id)
    first = scontrol_job(job_id)["NodeList"]
    os.kill(trainer_pid(job_id, 1), signal.SIGSTOP)
    stopped = time.monotonic()
    second = f"bfly: job {job_id} attempt 2"
    wait_for_text(log, second, job_id, timeout_s=240)
    wait_or_fail(lambda: "epoch 1/2 step" in log.read_text().split(second, 1)[1], 300, "training again", log, job_id)
    lost = time.monotonic() - stopped
    excluded = scontrol_job(job_id)["ExcNodeList"]
    assert wait_job_done(job_id, log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    line = re.search(rf"^bfly: excluding {first} from this job: rank 1 hung there at step [\d,]+$", text, re.M)
    assert line, text[-4000:]
    assert excluded == first and scontrol_job(job_id)["NodeList"] != first
    assert sacct(job_id, "NodeList") != [first]
    (blamed,) = ledger.read(run_dir)
    assert (blamed.node, blamed.reason) == (first, ledger.HANG)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")  # as if it had never hung
    print(
        f"{line[0]}; ran on {first}, then {scontrol_job(job_id)['NodeList']}; training again {lost:.0f} s after SIGSTOP"
    )


@slurm
@pytest.mark.slow
def test_a_hung_launch_submit_job_is_requeued_away_from_its_node_resumes_and_finishes(reference, tiny_data, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = (*EVERY_2, "run.hang_timeout_s=5", "run.startup_timeout_s=60", "run.stop_grace_s=10")
    out = launch_submit(run_dir, tiny_data, "--time", "10", overrides=overrides, paced=True)
    job = submitted_job(out, run_dir)
    log = run_dir / "submitit" / f"{job.job_id}_0_log.out"
    wait_for_text(log, f"epoch 1/2 step 5/{STEPS}", job.job_id)
    first = scontrol_job(job.job_id)["NodeList"]
    os.kill(trainer_pid(job.job_id, 1), signal.SIGSTOP)
    stopped = time.monotonic()
    second = f"bfly launch: job {job.job_id} attempt 2"
    wait_for_text(log, second, job.job_id, timeout_s=240)
    wait_or_fail(
        lambda: "epoch 1/2 step" in log.read_text().split(second, 1)[1], 300, "training again", log, job.job_id
    )
    lost = time.monotonic() - stopped
    excluded = scontrol_job(job.job_id)["ExcNodeList"]
    assert job_results(job, timeout_s=400)[0]["epochs_done"] == 2
    text = log.read_text()
    line = re.search(rf"^bfly launch: excluding {first} from this job: rank 1 hung there at step [\d,]+$", text, re.M)
    assert line, text[-4000:]
    assert excluded == first and scontrol_job(job.job_id)["NodeList"] != first
    # (the paced rank 0 may be recorded as a straggler too: recorded, never excluding)
    (blamed,) = [b for b in ledger.read(run_dir) if b.reason != ledger.STRAGGLER]
    assert (blamed.node, blamed.reason) == (first, ledger.HANG)
    assert_same_weights(run_dir / "last.pt", reference.run_dir / "last.pt")  # as if it had never hung
    print(
        f"{line[0]}; ran on {first}, then {scontrol_job(job.job_id)['NodeList']}; training again {lost:.0f} s after SIGSTOP"
    )


@slurm
@pytest.mark.slow
def test_a_hang_on_the_last_placeable_node_requeues_there_and_says_why_it_is_not_excluded(tiny_data, tmp_path):
    """The job's own --exclude=n2 leaves n1 only: the requeued job keeps n1 (and the user's exclusion)."""
    run_dir = tmp_path / "run"
    overrides = (*EVERY_2, "run.hang_timeout_s=5", "run.startup_timeout_s=60", "run.stop_grace_s=10")
    env = {"BFLY_MAX_RESTARTS": "0"}
    job_id, log = sbatch(
        SINGLE_NODE, run_dir, tiny_data, "--cpus-per-task=2", "--exclude=n2", overrides=overrides, env=env
    )
    wait_for_text(log, f"epoch 1/2 step 5/{STEPS}", job_id)
    os.kill(trainer_pid(job_id, 1), signal.SIGSTOP)
    assert wait_job_done(job_id, log, timeout_s=420) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    refused = re.search(r"^bfly: not excluding n1 \(rank 1 hung there at step [\d,]+\): (.*)$", text, re.M)
    assert refused and refused[1] == "it would leave 0 usable node(s) in the partition, this job needs 1", text[-3000:]
    assert "bfly: excluding" not in text and f"bfly: job {job_id} attempt 2" in text
    assert scontrol_job(job_id)["ExcNodeList"] == "n2" and scontrol_job(job_id)["NodeList"] == "n1"
    print(refused[0])
