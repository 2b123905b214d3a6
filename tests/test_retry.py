"""The retry policy (bfly.retry), used by the sbatch scripts and launch.submit's jobs: a crash or a hang is
retried a bounded number of times and only while the run gets further; a user error never.

The jobs that use it under a real SLURM are in tests/test_slurm.py (marker `slurm`).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from bfly.job import ledger
from bfly.job.exits import EXIT_HANG, EXIT_NODE_CHECK, EXIT_STOPPED, record_exit
from bfly.job.retry import (
    EXIT_DIR,
    STATE,
    after_failure,
    blames_of,
    decide,
    exit_records,
    job_status,
    node_check_status,
    record_hang,
    restart_line,
)

from conftest import PYTHON, REPO, subprocess_env, tiny_overrides
from probes.fault_launch import Launch, torchrun_cmd

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")


@pytest.mark.parametrize(
    "status,failures,before,now,requeue,why",
    [
        (1, 0, None, None, True, "crash (status 1): requeueing, failure 1 of 3; it resumes from the start"),
        (1, 0, None, 40, True, "crash (status 1): requeueing, failure 1 of 3; it resumes from checkpoint at step 40"),
        (EXIT_HANG, 1, 40, 60, True, "hang (status 76): requeueing, failure 2 of 3"),
        (1, 1, 40, 40, False, "crash (status 1): not requeueing, no progress since the last retry (still at step 40)"),
        (1, 1, 0, None, False, "no progress since the last retry (still at no checkpoint)"),
        (1, 3, 40, 80, False, "crash (status 1): not requeueing, 3 failure(s) requeued already (BFLY_MAX_FAILURES=3)"),
        (2, 0, None, 40, False, "user error (status 2): not requeueing, it would fail the same way"),
        (EXIT_STOPPED, 0, None, 40, False, "the time-limit and preemption requeue applies"),
        (0, 0, None, 40, False, "finished"),
    ],
)
def test_the_decision(status, failures, before, now, requeue, why):
    decision = decide(status, failures, 3, before, now)
    assert decision.requeue is requeue and why in decision.reason
    assert "\n" not in decision.reason


def test_the_jobs_status_from_what_each_trainer_recorded():
    def rec(rank, status):
        return {"rank": rank, "host": "n1", "status": status, "restart": 0}

    assert job_status([]) == (1, "no trainer recorded a status (killed)")
    assert job_status([rec(0, 1)]) == (1, "status 1 on rank 0 (n1)")  # rank 1 was killed: recorded nothing
    assert job_status([rec(0, 1), rec(1, 2)])[0] == 2  # one rank's user error: the job's
    assert job_status([rec(0, EXIT_HANG), rec(1, 1)]) == (
        EXIT_HANG,
        "status 1 on rank 1 (n1); status 76 on rank 0 (n1)",
    )


def test_a_hang_is_described_by_the_rank_the_watchdog_named_not_by_the_rank_that_ended_with_its_status():
    named = {"rank": 0, "host": "n1", "status": EXIT_HANG, "restart": 0, "cause": "hang on rank 1 (n2) at step 4"}
    assert job_status([named]) == (EXIT_HANG, "hang on rank 1 (n2) at step 4 (status 76 on rank 0 (n1))")


def test_the_restart_line_names_the_hang_from_the_exit_records(tmp_path, monkeypatch):
    monkeypatch.setenv("BFLY_EXIT_STATUS_DIR", str(tmp_path / EXIT_DIR))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    record_exit(EXIT_HANG, "hang on rank 1 (n2) at step 4")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert restart_line(tmp_path) == (
        "restart 1 of 2 inside this job (torchrun --max-restarts) after: hang on rank 1 (n2) at step 4 "
        f"(status 76 on rank 0 ({os.uname().nodename}))"
    )


def test_without_exit_records_the_restart_line_names_the_hang_this_torchrun_declared(tmp_path, monkeypatch):
    monkeypatch.delenv("BFLY_EXIT_STATUS_DIR", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    record_hang(tmp_path, "hang on rank 1 (n2) at step 4")  # written after this process's parent started
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert restart_line(tmp_path) == (
        "restart 1 of 2 inside this job (torchrun --max-restarts) after: hang on rank 1 (n2) at step 4"
    )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")  # another torchrun's hang is not this one's
    assert restart_line(tmp_path) is not None and restart_line(tmp_path).endswith("after: a trainer failed")  # type: ignore[union-attr]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # the hang was two rounds ago
    assert restart_line(tmp_path).endswith("after: a trainer failed")  # type: ignore[union-attr]
    assert restart_line(None).endswith("after: a trainer failed")  # type: ignore[union-attr]


def save_checkpoint_at(run_dir, step):
    """A last.pt a resume would start from at `step`, as far as the retry decision reads it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "epoch": 0}, run_dir / "last.pt")


def test_the_failure_count_lives_in_the_run_directory_across_requeues(tmp_path, monkeypatch):
    """What three attempts of one SLURM job see: the count and the last step survive the requeue (a new
    process each time), each attempt decides once whichever rank asks, and a new job starts afresh."""
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("BFLY_MAX_FAILURES", "2")

    def attempt(restart, step):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        save_checkpoint_at(run, step)
        return after_failure(run, 1, "status 1 on rank 0 (n1)")

    first = attempt(0, 4)
    assert first.requeue and first.taken_here
    again = after_failure(run, 1, "status 1 on rank 1 (n1)")  # another rank of the same attempt
    assert again.requeue and not again.taken_here and again.reason == first.reason
    assert attempt(1, 8).requeue
    last = attempt(2, 12)
    assert not last.requeue and "2 failure(s) requeued already (BFLY_MAX_FAILURES=2)" in last.reason
    state = json.loads((run / STATE).read_text())
    assert (state["failures"], state["step"]) == (2, 8)
    log = (run / "train.log").read_text()
    assert log.count("job 17 attempt") == 3 and "job 17 attempt 3 failed: crash (status 1): not requeueing" in log
    monkeypatch.setenv("SLURM_JOB_ID", "18")  # submitted again: a new budget
    assert attempt(0, 12).requeue


@pytest.mark.slow
def test_a_restart_after_a_user_error_is_refused_at_once(tiny_data, tmp_path):
    """torchrun --max-restarts restarts on any failure; a restarted trainer that finds the previous start
    ended with a user error (here: data.root has no dataset) exits 2 at once instead of failing again."""
    run = tmp_path / "run"
    exits = tmp_path / "exits"
    args = tiny_overrides(tmp_path / "no-such-data", run)
    launch = Launch(torchrun_cmd(2, args, max_restarts=2), timeout=240, env={"BFLY_EXIT_STATUS_DIR": str(exits)})
    assert launch.wait() != 0
    out = launch.output
    # torchrun restarts twice; each restart is refused before any start-up work.
    printed = [line for line in out.splitlines() if line.startswith("bfly.train: error")]  # not torchrun's summary
    refusals = [
        line for line in printed if "not restarting: the previous start ended with a user error on rank 0" in line
    ]
    # The first start met the error; no restart did start-up work again (torchrun may end rank 0 of a restart
    # before it prints, once rank 1 has exited with the same refusal).
    assert sum("dataset root is not a directory" in line for line in printed) == 1, "\n".join(printed)
    assert 1 <= len(refusals) <= 2 and len(printed) == 1 + len(refusals), out[-3000:]
    records = exit_records(exits)
    assert [(r["rank"], r["status"], r["restart"]) for r in records] == [(0, 2, 2), (1, 2, 2)]


def test_the_scripts_helper_refuses_a_config_error_before_anything_starts(tmp_path):
    """`python -m bfly.retry begin`, as the sbatch scripts run it before torchrun."""
    env = subprocess_env(SLURM_JOB_ID="5")
    cmd = [PYTHON, "-m", "bfly.retry", "begin", f"run.dir={tmp_path / 'run'}", "train.epochs=zero"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("bfly: error: ") and "train.epochs" in out.stderr
    assert "not training, not requeueing" in out.stderr
    ok = subprocess.run(cmd[:-1], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [str(tmp_path / "run" / EXIT_DIR), os.environ.get("BFLY_MAX_RESTARTS", "2")]
    assert "bfly: job 5 attempt 1: 0 failure requeue(s) of BFLY_MAX_FAILURES=3" in ok.stderr


@pytest.mark.parametrize(
    "failures, changed, requeue, why",
    [
        (0, True, True, "failed node check (status 77): requeueing away from the failing node(s), failure 1 of 3"),
        (0, False, False, "failed node check (status 77): not requeueing, no failing node can be excluded"),
        (3, True, False, "3 failure(s) requeued already (BFLY_MAX_FAILURES=3)"),
    ],
)
def test_a_failed_node_check_requeues_only_away_from_the_failing_node(failures, changed, requeue, why):
    decision = decide(EXIT_NODE_CHECK, failures, 3, 40, 40, placement_changed=changed)  # no progress: nothing trained
    assert decision.requeue is requeue and why in decision.reason


def test_the_node_checks_record_is_the_attempts_status(tmp_path):
    assert node_check_status(tmp_path) is None
    (tmp_path / "nodecheck.json").write_text(json.dumps({"status": 77, "detail": "n2: torch 0.0.0 differs"}))
    assert node_check_status(tmp_path) == (77, "n2: torch 0.0.0 differs")


def test_an_exit_record_holds_the_slurm_node_and_the_error_written_for_torchrun(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {"message": "stopping, a collective failed (NCCL error: x)"}}))
    for name, value in {
        "BFLY_EXIT_STATUS_DIR": str(tmp_path / "exits"),
        "TORCHELASTIC_ERROR_FILE": str(error_file),
        "SLURMD_NODENAME": "n2",
        "RANK": "1",
        "WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(name, value)
    record_exit(1)
    (got,) = exit_records(tmp_path / "exits")
    assert (got["node"], got["rank"], got["error"]) == ("n2", 1, "stopping, a collective failed (NCCL error: x)")


HANG_LINE = (
    "hang: no rank has made progress for 9 s (limit 8 s); stalled: rank 1 (vm, pid 11979) is stopped (process "
    "state T), in forward-backward, last step 4, 9 s since its last progress; stacks ...; ending the job (exit 76)"
)


@pytest.mark.parametrize("where", ["train.log", "attempts.jsonl after another rank's crash record"])
def test_a_hang_blames_the_node_its_line_names_wherever_the_line_was_written(where, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "33")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    log = ["2026-12-06 07:00:00 job 33 attempt 1: 0 failure requeue(s) of BFLY_MAX_FAILURES=3"]
    records = [{"event": "start", "attempt": 1, "slurm_job_id": "33", "slurm_restart_count": None}]
    if where == "train.log":
        log.append(f"2026-12-06 07:01:00 {HANG_LINE}")
    else:
        records += [
            {"event": "end", "attempt": 1, "ended": "crash", "detail": "Connection reset by peer", "global_step": 5},
            {"event": "end", "attempt": 1, "ended": "hang", "detail": HANG_LINE, "global_step": 5},
        ]
    (tmp_path / "train.log").write_text("\n".join(log) + "\n")
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (got,) = blames_of(tmp_path, EXIT_HANG, [], "33", ("n1",))
    assert (got.node, got.reason, got.what, got.step) == ("n1", "hang", "rank 1 hung there at step 4", 4)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the next attempt: that hang is not its own
    assert blames_of(tmp_path, EXIT_HANG, [], "33", ("n1",)) == []


def test_a_torchrun_restart_on_slurm_blames_the_hung_node_once_and_says_so(tmp_path, monkeypatch):
    """The restarted trainers' rank 0 puts the node of the previous round's hang into the ledger: a later
    requeue of the job avoids it, and the requeue's own reading of the same hang adds nothing."""
    monkeypatch.setenv("SLURM_JOB_ID", "33")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("BFLY_EXIT_STATUS_DIR", str(tmp_path / EXIT_DIR))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(ledger, "job", lambda job_id: ledger.Job(("n1",), 1, ("debug",), ()))
    log = ["2026-12-06 07:00:00 job 33 attempt 1: 0 failure requeue(s) of BFLY_MAX_FAILURES=3"]
    (tmp_path / "train.log").write_text("\n".join([*log, f"2026-12-06 07:01:00 {HANG_LINE}"]) + "\n")
    (tmp_path / "attempts.jsonl").write_text(
        json.dumps({"event": "start", "attempt": 1, "slurm_job_id": "33", "slurm_restart_count": None}) + "\n"
    )
    record_exit(EXIT_HANG, "hang on rank 1 (vm) at step 4")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    line = restart_line(tmp_path, blame=True)
    assert line is not None and line.endswith(
        "after: hang on rank 1 (vm) at step 4 "
        f"(status 76 on rank 0 ({os.uname().nodename})); n1 is a suspect node (rank 1 hung there at step 4): "
        "a requeue of this job avoids it"
    ), line
    assert [(b.node, b.reason, b.job) for b in ledger.read(tmp_path)] == [("n1", "hang", "33")]
    assert restart_line(tmp_path) is not None and len(ledger.read(tmp_path)) == 1  # other ranks blame nothing
    ledger.add(tmp_path, blames_of(tmp_path, EXIT_HANG, [], "33", ("n1",)))  # the requeue reads the same hang
    assert len(ledger.read(tmp_path)) == 1
