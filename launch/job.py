"""What every task of a submitted job runs: one trainer process, `bfly.job.train.run_job` in-process.

One SLURM task per GPU: submitit starts the tasks, so torchrun is not involved; the distributed
environment torchrun would give (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) is exported
from SLURM's before the trainer starts.

On SLURM every task first takes part in the node check (bfly.nodecheck, in-process; run.node_check=false
skips it): a failing node is named and blamed in the run's suspect-node ledger, and the job ends before
training (status 77) or requeues away from that node.

A task that fails by a crash or a hang asks bfly.retry whether the job requeues (BFLY_MAX_FAILURES,
only while the run makes progress, never after a user error); the first task to ask decides for all and
requeues the job with `scontrol requeue`, then excludes the nodes blamed for the failure from its next
placement (bfly/job/ledger.py); they all leave without a result, so the submitter waits on.

Time limit and preemption: submitit sends its signal (SIGUSR2) to every task. The trainer catches it
(from its start), stops at the next step with a checkpoint and returns its outcome; this callable then hands
the signal back to submitit, which calls `checkpoint()` and requeues the job (rank 0). Before and
after the trainer, submitit's own handler does that directly. Either way the requeued job runs
the same command with run.resume=auto and continues from the run directory's last.pt; so does
a job that SLURM requeues by itself (preemption, `scontrol requeue`) without asking us.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit

from bfly.job import retry
from bfly.job.exits import EXIT_HANG, EXIT_NODE_CHECK
from bfly.run.runlog import read_metrics


class TrainingFailed(RuntimeError):
    pass


class TrainJob(submitit.helpers.Checkpointable):
    """bfly.train with fixed arguments (run.dir included); threads: torch CPU threads (the task's CPUs)."""

    def __init__(self, train_args: list[str], run_dir: str, workdir: str, threads: int | None = None):
        self.train_args = list(train_args)
        self.run_dir = run_dir
        self.workdir = workdir  # where relative paths in the config resolve, as on the login node
        self.threads = threads

    def __call__(self) -> dict[str, Any] | None:
        from bfly.job.train import run_job  # imports torch: only inside the job

        os.chdir(self.workdir)
        dist = export_distributed_env()
        if dist.rank == 0:
            print(f"bfly launch: {retry.log_attempt(Path(self.run_dir), torchrun=False)}", flush=True)
        checked = node_check(self.train_args, dist)
        if checked != 0:
            requeue_after_failure(checked, Path(self.run_dir), dist.rank)
            raise TrainingFailed(f"node check failed (status {checked}, rank {dist.rank}): see rank 0's log")
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

        def on_hang(line: str) -> None:
            # A hang ends this process from the watchdog's thread (the main thread is stuck): the retry is decided there.
            requeue_if_retried(EXIT_HANG, Path(self.run_dir), dist.rank)

        result = run_job(self.train_args, on_hang=on_hang)
        if result.outcome is None and result.exit_code != 0:
            requeue_after_failure(result.exit_code, Path(self.run_dir), dist.rank)
            raise TrainingFailed(
                f"bfly.train exited with status {result.exit_code} (rank {dist.rank}); its error is in this task's log"
            )
        if result.outcome is not None and result.outcome.by_signal:
            leave_after_signal(result.outcome.signals, dist.rank)
        return summary(Path(self.run_dir)) if dist.rank == 0 else None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The state lives in the run directory (last.pt): a fresh copy of this job resumes from it.
        return submitit.helpers.DelayedSubmission(TrainJob(self.train_args, self.run_dir, self.workdir, self.threads))


def leave_after_signal(caught: tuple[str, ...], rank: int) -> None:
    """The trainer stopped on a signal and wrote its checkpoint: requeue, or leave without a result.

    A result file would tell the submitter the job is over while SLURM may still requeue it, so a
    stopped task never returns normally (SystemExit writes no result)."""
    requeue_signal = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    if requeue_signal.name in caught:
        # submitit's handler is back in place: rank 0 calls checkpoint(), requeues and exits;
        # on the other ranks it returns.
        signal.raise_signal(requeue_signal)
        print(f"bfly launch: rank {rank} stopped for a requeue", flush=True)
    else:
        print(
            f"bfly launch: rank {rank} stopped by {', '.join(caught) or 'a signal to another rank'}: not requeueing here (SLURM requeues "
            "a preempted job itself; the run resumes from its last checkpoint)",
            flush=True,
        )
    sys.exit(0)


def node_check(train_args: list[str], dist: submitit.helpers.TorchDistributedEnvironment) -> int:
    """On SLURM: every node of the job checked before training, the tasks meeting at the rendezvous address."""
    if submitit.JobEnvironment().cluster != "slurm":
        return 0
    from bfly.job import nodecheck

    # The port next to training's: rank 0 closes the check's store as training's starts on its own port, and a
    # rank that reached training's rendezvous first would otherwise meet the check's store as it closes.
    return nodecheck.main([*train_args, f"--rdzv={dist.master_addr}:{dist.master_port + 1}"])


def requeue_after_failure(status: int, run_dir: Path, rank: int) -> None:
    """On SLURM: requeue the job if bfly.retry says so, and leave without a result (the job goes on);
    otherwise return, and the task fails. The requeued job avoids the nodes blamed for the failure."""
    if requeue_if_retried(status, run_dir, rank):
        sys.exit(0)  # no result file: the submitter keeps waiting for the requeued job


def requeue_if_retried(status: int, run_dir: Path, rank: int) -> bool:
    """On SLURM: requeue the job if bfly.retry says so (the first task to ask decides for all; it excludes the
    nodes blamed for the failure). True: the job goes on, this task leaves without a result."""
    if submitit.JobEnvironment().cluster != "slurm":
        return False
    # A failed node check requeues only if the job can avoid the failing node (read-only: the check blamed).
    placement = retry.blame_and_exclude(run_dir, status, []) if status == EXIT_NODE_CHECK else None
    detail = f"status {status} on rank {rank} ({socket.gethostname()})"
    decision = retry.after_failure(run_dir, status, detail, placement is not None and placement.changed)
    for line in placement.refused if placement and not decision.requeue else []:
        print(f"bfly launch: {line}", flush=True)
    print(f"bfly launch: rank {rank}: {decision.reason}", flush=True)
    if not decision.requeue:
        return False
    if decision.taken_here:
        placement = placement or retry.blame_and_exclude(run_dir, status, [])
        for line in placement.lines if placement else []:
            print(f"bfly launch: {line}", flush=True)
        requeue(submitit.JobEnvironment().job_id, placement.nodes if placement and placement.changed else ())
    return True


def requeue(job_id: str, exclude: tuple[str, ...]) -> None:
    """`scontrol requeue`, then the job's new exclusion list: SLURM takes it only once the job no longer runs."""
    if threading.current_thread() is threading.main_thread():  # elsewhere (a hang) the trainer's handler holds it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's SIGTERM must not end this task first
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    print(f"bfly launch: requeued job {job_id}", flush=True)
    if not exclude:
        return
    for _ in range(50):
        cmd = ["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(exclude)}"]
        if subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(0.2)
    print(f"bfly launch: warning: could not exclude {','.join(exclude)} from job {job_id}", flush=True)


def summary(run_dir: Path) -> dict[str, Any]:
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return {"run_dir": str(run_dir), "epochs_done": len(records), "last_epoch": records[-1] if records else None}


def export_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them."""
    dist = submitit.helpers.TorchDistributedEnvironment()
    cluster = submitit.JobEnvironment().cluster
    if cluster == "slurm":
        dist.master_addr = node_address(dist.master_addr)
    elif cluster in ("local", "debug"):
        dist.master_addr = "127.0.0.1"  # every task runs on this machine
    # Each task keeps every GPU of its node in view and picks LOCAL_RANK (bfly.distributed).
    return dist.export(set_cuda_visible_devices=False, overwrite=True)


def node_address(node: str) -> str:
    """The address SLURM reaches `node` at (NodeAddr): node names need not resolve as hostnames."""
    out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True, timeout=60)
    match = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if match and match.group(1) != "(null)":
        return match.group(1)
    try:
        socket.getaddrinfo(node, None)
    except OSError as e:
        raise RuntimeError(
            f"cannot find the address of the first node {node!r}: 'scontrol show node' gave "
            f"{(out.stderr or out.stdout).strip()[:200]!r} and the name does not resolve ({e})"
        ) from None
    return node
