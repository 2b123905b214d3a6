"""run.dir/attempts.jsonl: one start line per start of a job (first run, resume, requeue), one end line
per job that could write one, and `bfly.report --attempts` showing the history in one table."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from bfly.job import attempts
from bfly.job.exits import EXIT_STOPPED

from conftest import REPO, read_jsonl, run_python
from probes.fault_launch import Launch, fault_args, run_to_end, train_cmd

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_a_run_stopped_killed_and_resumed_to_the_end_has_one_record_per_attempt(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = fault_args(tiny_data, run)
    # 1. Stopped by SIGTERM (as timeout and SLURM send it): exit 75, an end line "signal".
    first = Launch(train_cmd(args), timeout=300)
    first.wait_step(1)
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.wait(60) == EXIT_STOPPED
    # 2. Requeued by SLURM (its ids in the environment), then SIGKILLed: no end line can be written.
    requeue = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}
    second = Launch(train_cmd(args), timeout=300, env=requeue)
    second.wait_for(r"^resumed from ")
    stopped_at = second.wait_step(torch.load(run / "last.pt", weights_only=True)["global_step"] + 1)
    os.kill(second.proc.pid, signal.SIGKILL)
    assert second.wait(30) == -signal.SIGKILL
    # 3. Resumed and finished.
    run_to_end(train_cmd(args))

    lines = read_jsonl(run / attempts.FILE)
    assert [(r["event"], r["attempt"]) for r in lines] == [
        ("start", 1),
        ("end", 1),
        ("start", 2),
        ("start", 3),
        ("end", 3),
    ]
    history = attempts.read(run)
    assert [attempts.ended(a) for a in history] == [attempts.SIGNAL, attempts.NO_RECORD, attempts.FINISHED]
    assert [a["previous_ended"] for a in history] == [None, attempts.SIGNAL, attempts.NO_RECORD]
    assert history[0]["end"]["detail"] == "SIGTERM"
    assert history[0]["start_step"] == 0 and history[0]["end"]["global_step"] >= 1
    assert history[1]["start_step"] == history[0]["end"]["global_step"]  # resumed where it stopped
    assert 0 < history[2]["start_step"] <= stopped_at and history[2]["end"]["global_step"] == 10
    assert (history[1]["slurm_job_id"], history[1]["slurm_restart_count"]) == ("4242", "1")
    assert history[0]["slurm_job_id"] is None and history[0]["torchrun_restart_count"] is None
    for a in history:
        assert a["world_size"] == 1 and a["hosts"] == [os.uname().nodename] and a["device"] == "cpu"
        assert a["command"][-len(args) :] == args and "bfly.train" in a["command"]
        assert a["bfly"] == {
            "version": "0.1.0",
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
        v = a["versions"]
        assert v["torch"] == torch.__version__ and v["python"] == ".".join(map(str, sys.version_info[:3]))
        assert v["torchvision"] and v["timm"] and v["cudnn"] is None and v["nccl"] is None  # CPU run
        assert a["gpus"] == []

    report = run_python("-m", "bfly.report", str(run), "--attempts", timeout=60)
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert "| signal (SIGTERM) |" in rows[0] and "| 4242 | requeue 1 |" in rows[1]
    assert "| crash (no end record" in rows[1] and "| finished | 10 |" in rows[2]
    print(report.stdout)


def test_report_attempts_names_a_run_without_a_history(tmp_path):
    out = run_python("-m", "bfly.report", str(tmp_path), "--attempts", timeout=60)
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"bfly.report: error: {tmp_path / attempts.FILE} not found (runs started before it existed have none)"
    )
