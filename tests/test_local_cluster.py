"""Smoke test of slurm/local_cluster.sh: a real local SLURM cluster comes up,
runs a batch job that accounting reports COMPLETED, spans both nodes, and goes
down again. A cluster that was already up is used and left running."""

import os
import shutil
import subprocess

import pytest

from conftest import local_cluster, wait_until

SLURM_COMMANDS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd")

pytestmark = pytest.mark.slurm


def skip_reason():
    if os.geteuid() != 0:
        return "local SLURM cluster needs root (it starts system daemons)"
    installed = all(shutil.which(c) for c in SLURM_COMMANDS)
    if not installed and shutil.which("apt-get") is None:
        return "SLURM packages not installed and apt-get unavailable to install them"
    return None


def accounting_state(job_id):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip()


def wait_for_state(job_id, wanted, timeout_s=30):
    wait_until(lambda: accounting_state(job_id) == wanted, timeout_s)
    return accounting_state(job_id)


@pytest.fixture(scope="module")
def running_cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    was_up = local_cluster("status").returncode == 0
    up = local_cluster("up")
    assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        down = local_cluster("down")
        assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"


def test_up_reports_both_nodes_idle_and_is_idempotent(running_cluster):
    again = local_cluster("up")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert "node n1: partition=debug* state=idle" in again.stdout
    assert "node n2: partition=debug* state=idle" in again.stdout


def test_batch_job_runs_and_accounting_reports_completed(running_cluster, tmp_path):
    out_file = tmp_path / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--output={out_file}", "--wrap", "echo ran on $SLURMD_NODENAME"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    job_id = submit.stdout.strip().split(";")[0]
    assert wait_for_state(job_id, "COMPLETED") == "COMPLETED"
    assert out_file.read_text().strip() in ("ran on n1", "ran on n2")


def test_failing_job_is_reported_failed(running_cluster, tmp_path):
    submit = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "--wrap", "exit 3"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert wait_for_state(submit.stdout.strip(), "FAILED") == "FAILED"


def test_srun_spans_both_nodes(running_cluster):
    run = subprocess.run(
        ["srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(run.stdout.split()) == ["n1", "n2"]


def test_gpu_request_is_rejected(running_cluster):
    submit = subprocess.run(["sbatch", "--gres=gpu:1", "--wrap", "true"], capture_output=True, text=True)
    assert submit.returncode != 0


def run_count(runs):
    return len(runs.read_text().splitlines()) if runs.exists() else 0


@pytest.mark.slow
def test_requeued_job_reruns_within_20_seconds(running_cluster, tmp_path):
    # The cluster holds a requeued job for cred_expire+1 = 11 s (Slurm default: 121 s).
    runs = tmp_path / "runs.txt"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "--output=/dev/null", "--wrap", f"echo run >> {runs}; sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submit.stdout.strip()
    try:
        assert wait_until(lambda: run_count(runs) == 1, 30)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        assert wait_until(lambda: run_count(runs) == 2, 20)
    finally:
        subprocess.run(["scancel", job_id])
