"""Retrying a job that failed: one policy for the sbatch scripts and launch.submit's jobs.

Two levels:

* Inside a job, torchrun restarts the trainers after one fails (`--max-restarts=$BFLY_MAX_RESTARTS`,
  default 2, in our sbatch scripts); they resume from last.pt. A restart after a user error is refused
  at once: the error would only repeat.
* Across jobs, a job that failed by a crash (status 1) or a hang (EXIT_HANG) is requeued up to
  BFLY_MAX_FAILURES times (default 3, counted per SLURM job, apart from the time-limit requeues), and
  only while the run makes progress: a failure with no newer checkpoint than at the previous failure
  requeue stops the job. Never after a user error (status 2). A job stopped by a signal with its
  checkpoint written (EXIT_STOPPED, or 0 under our sbatch scripts) keeps its own path: the time-limit
  and preemption requeue. A job whose node check failed (EXIT_NODE_CHECK, 77: bfly.nodecheck) requeues
  only when the failing node can be excluded from its next placement, within the same budget.

Before a requeue, the nodes blamed during this job (a hang naming a rank's host, a crash with a CUDA- or
NCCL-looking error, a failed node check: bfly/job/ledger.py, run.dir/suspect_nodes.json) are excluded from
its next placement: `after` prints them on its second line for the sbatch scripts' `scontrol update
JobId=... ExcNodeList=...`, which SLURM accepts only once the job is no longer running (after `scontrol
requeue`, while it completes or waits).

The failure count and the checkpoint step of the last failure requeue are kept in the run directory
(retries.json), so they survive the requeue. torchrun reports any failed trainer as its own status 1:
under our sbatch scripts each trainer records its exit status in <run dir>/.bfly-exit
(BFLY_EXIT_STATUS_DIR), and the job's status is read from there.

    python -m bfly.retry begin [--config X] [key=value ...]   # before torchrun: prints the records' folder
    python -m bfly.retry after [--config X] [key=value ...]   # after it failed: prints `requeue` and the
                                                              # nodes to exclude, or exits with the job's status
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bfly.core import env as environ
from bfly.core.errors import one_line
from bfly.job import ledger
from bfly.job.exits import EXIT_CRASH, EXIT_HANG, EXIT_NODE_CHECK, EXIT_STOPPED, EXIT_USER_ERROR
from bfly.run.rundir import locked_json

STATE = "retries.json"
EXIT_DIR = ".bfly-exit"


def cause(status: int) -> str:
    if status == EXIT_USER_ERROR:
        return "user error (status 2)"
    if status == EXIT_HANG:
        return f"hang (status {EXIT_HANG})"
    if status == EXIT_STOPPED:
        return f"stopped by a signal (status {EXIT_STOPPED})"
    if status == EXIT_NODE_CHECK:
        return f"failed node check (status {EXIT_NODE_CHECK})"
    return f"crash (status {status})"


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str  # one line
    taken_here: bool = True  # False: another rank of the job took it for this attempt (it requeues)


def decide(
    status: int,
    failures: int,
    max_failures: int,
    step_before: int | None,
    step_now: int | None,
    placement_changed: bool = False,
) -> Decision:
    """Requeue a job that ended with `status`? failures: failure requeues of this job so far; step_before:
    the run's checkpoint step at the last of them (None: there was none); step_now: its checkpoint step
    now (None: no checkpoint); placement_changed: the requeued job would avoid a node it ran on."""
    what = cause(status)
    if status == 0:
        return Decision(False, "finished")
    if status == EXIT_STOPPED:
        return Decision(False, f"{what}: the time-limit and preemption requeue applies, not this one")
    if status == EXIT_USER_ERROR:
        return Decision(False, f"{what}: not requeueing, it would fail the same way; fix it and submit again")
    if failures >= max_failures:
        return Decision(
            False,
            f"{what}: not requeueing, {failures} failure(s) requeued already (BFLY_MAX_FAILURES={max_failures})",
        )
    if status == EXIT_NODE_CHECK:  # nothing trained: progress is no measure, a new placement is
        if not placement_changed:
            return Decision(False, f"{what}: not requeueing, no failing node can be excluded (see above)")
        return Decision(
            True, f"{what}: requeueing away from the failing node(s), failure {failures + 1} of {max_failures}"
        )
    if step_before is not None and (step_now or 0) <= step_before:
        at = f"step {step_now}" if step_now is not None else "no checkpoint"
        return Decision(False, f"{what}: not requeueing, no progress since the last retry (still at {at})")
    start = f"checkpoint at step {step_now}" if step_now is not None else "the start (no checkpoint yet)"
    return Decision(True, f"{what}: requeueing, failure {failures + 1} of {max_failures}; it resumes from {start}")


def checkpoint_step(run_dir: Path) -> int | None:
    """The global step a resume would start from (the run's newest complete checkpoint); None: none."""
    from bfly.core import checkpoint as ckpt

    try:
        found = ckpt.load_resumable(run_dir, lambda _: None)
    except ckpt.CheckpointError:
        return None
    return int(found[0]["global_step"]) if found else None


# --- what each trainer leaves for the launcher (bfly.job.exits.record_exit writes it) ------------------


def exit_records(where: Path, restart: int | None = None) -> list[dict[str, Any]]:
    """The statuses of the trainers of torchrun round `restart` (default: the last round that recorded any)."""
    records = []
    for path in sorted(where.glob("rank-*.json")) if where.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    last = max((r["restart"] for r in records), default=0) if restart is None else restart
    return [r for r in records if r["restart"] == last]


def job_status(records: list[dict[str, Any]]) -> tuple[int, str]:
    """The status of a job whose launcher (torchrun) failed, and which ranks said what. A user error on any
    rank makes it a user error; a hang on any rank a hang; anything else is a crash."""
    by_status: dict[int, list[str]] = {}
    for r in records:
        by_status.setdefault(r["status"], []).append(f"{r['rank']} ({r['host']})")
    detail = "; ".join(f"status {s} on rank {', '.join(ranks)}" for s, ranks in sorted(by_status.items()))
    detail = detail or "no trainer recorded a status (killed)"
    causes = list(dict.fromkeys(r["cause"] for r in records if r.get("cause")))
    if causes:  # the rank that ended with a hang's status is the one that named it, not the stalled one
        detail = f"{'; '.join(causes)} ({detail})"
    for status in (EXIT_USER_ERROR, EXIT_HANG):
        if status in by_status:
            return status, detail
    return EXIT_CRASH, detail


def refused_restart() -> int | None:
    """In a trainer that torchrun restarted: EXIT_USER_ERROR if the previous round ended with a user error
    (restarting would fail the same way), else None."""
    where = environ.exit_status_dir()
    restart, _ = environ.restart_count()
    if where is None or restart == 0:
        return None
    previous = exit_records(where, restart - 1)
    failed = [r for r in previous if r["status"] == EXIT_USER_ERROR]
    if not failed:
        return None
    if environ.dist_env().is_main:
        print(
            f"bfly.train: error: not restarting: the previous start ended with a user error on rank "
            f"{failed[0]['rank']} ({failed[0]['host']}); its message is above",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_USER_ERROR


def restart_line(run_dir: Path | None = None, blame: bool = False) -> str | None:
    """Rank 0 of restarted trainers: which restart this is and why (for the console and train.log): from
    the exit records, else (BFLY_EXIT_STATUS_DIR unset) from the hang the previous round declared.
    blame: on SLURM, the nodes the previous round's failure points at go into the ledger (said in the line)."""
    restart, allowed = environ.restart_count()
    if restart == 0:
        return None
    where = environ.exit_status_dir()
    previous = exit_records(where, restart - 1) if where else []
    hang = declared_hang(run_dir, restart - 1) if run_dir and not previous else None
    why = job_status(previous)[1] if previous else hang or "a trainer failed"
    line = f"restart {restart} of {allowed} inside this job (torchrun --max-restarts) after: {why}"
    if blame and run_dir is not None:
        status = job_status(previous)[0] if previous else EXIT_HANG if hang else EXIT_CRASH
        blamed = blame_restart(run_dir, status, previous)
        line += "".join(f"; {b.node} is a suspect node ({b.what}): a requeue of this job avoids it" for b in blamed)
    return line


def blame_restart(run_dir: Path, status: int, records: list[dict[str, Any]]) -> list[ledger.Blame]:
    """Inside a SLURM job, after torchrun restarted the trainers: the nodes the previous round's failure
    points at, added to the ledger now (a restart runs on the same nodes; the job's next requeue avoids
    them, even if the restarted round ends well and a later stop requeues it)."""
    job_id = environ.slurm_job_id()
    if job_id is None or status in (0, EXIT_USER_ERROR, EXIT_STOPPED):
        return []
    try:
        blames = blames_of(run_dir, status, records, job_id, ledger.job(job_id).nodes)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"bfly: cannot read job {job_id}'s placement ({one_line(e)}): no node blamed", file=sys.stderr)
        return []
    return ledger.add(run_dir, blames)


# --- the hang a round of trainers declared (for the restart line without exit records) -----------------

HANG_CAUSE = "hang/cause.json"


def record_hang(run_dir: Path, cause: str) -> None:
    """The cause of a hang the watchdog declared, in run.dir/hang/, for the restarted trainers' line."""
    record = {
        "cause": cause,
        "restart": environ.restart_count()[0],
        "run_id": environ.elastic_run_id(),
        "time": time.time(),
    }
    with contextlib.suppress(OSError):
        path = run_dir / HANG_CAUSE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".cause.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)


def declared_hang(run_dir: Path, restart: int) -> str | None:
    """The cause recorded by `record_hang` in torchrun round `restart` of this torchrun (same run id, written
    after this trainer's agent started), else None."""
    try:
        record = json.loads((run_dir / HANG_CAUSE).read_text())
    except (OSError, ValueError):
        return None
    started = _parent_started()
    if record.get("restart") != restart or record.get("run_id") != environ.elastic_run_id():
        return None
    if started is None or record.get("time", 0) < started:
        return None
    return str(record["cause"])


def _parent_started() -> float | None:
    """When this process's parent (torchrun's agent) started, in seconds since the epoch (Linux /proc)."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# --- the state kept in the run directory ------------------------------------------------------------


def _locked_state(run_dir: Path) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """retries.json, read and rewritten under a lock (several ranks of a submitit job may fail at once)."""
    return locked_json(run_dir / STATE)


def after_failure(run_dir: Path, status: int, detail: str, placement_changed: bool = False) -> Decision:
    """The decision for this job attempt's failure, taken once per attempt (SLURM job id and restart
    count): every rank that asks gets the same one. The reason is written to train.log once."""
    job = environ.slurm_job_id() or "local"
    attempt = f"{job}.{environ.slurm_restart_count()}"
    with _locked_state(run_dir) as state:
        if state.get("attempt") == attempt:
            return Decision(state["requeue"], state["reason"], taken_here=False)
        if state.get("job") != job:  # a new submission gets a new budget
            state.update(job=job, failures=0, step=None)
        step_now = checkpoint_step(run_dir)
        decision = decide(status, state["failures"], environ.max_failures(), state["step"], step_now, placement_changed)
        if decision.requeue:
            state.update(failures=state["failures"] + 1, step=step_now)
        reason = f"{decision.reason} [{detail}]"
        state.update(attempt=attempt, requeue=decision.requeue, reason=reason, cause=cause(status))
    _to_train_log(run_dir, f"job {job} attempt {environ.slurm_restart_count() + 1} failed: {reason}")
    return Decision(decision.requeue, reason)


def log_attempt(run_dir: Path, torchrun: bool) -> str:
    """What a job attempt starts with: its number, the failure requeues so far and why the last was;
    written to train.log (when the run directory exists) and returned for the job's log."""
    job = environ.slurm_job_id() or "local"
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((run_dir / STATE).read_text())
    failures = state.get("failures", 0) if state.get("job") == job else 0
    line = (
        f"job {job} attempt {environ.slurm_restart_count() + 1}: {failures} failure requeue(s) of "
        f"BFLY_MAX_FAILURES={environ.max_failures()}"
    )
    if torchrun:
        line += f", torchrun restarts up to BFLY_MAX_RESTARTS={environ.max_restarts()}"
    if failures and state.get("requeue"):
        line += f"; last requeued after {state.get('cause')}"
    _to_train_log(run_dir, line)
    return line


def _to_train_log(run_dir: Path, msg: str) -> None:
    from bfly.run.runlog import append_to_train_log

    append_to_train_log(run_dir, msg)


# --- the nodes a requeued job avoids (bfly/job/ledger.py) ----------------------------------------------------


def node_check_status(where: Path) -> tuple[int, str] | None:
    """The status and detail bfly.nodecheck recorded when a node failed the check (None: it did not)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        record = json.loads((where / "nodecheck.json").read_text())
        return int(record["status"]), str(record["detail"])
    return None


@dataclass(frozen=True)
class Placement:
    nodes: tuple[str, ...]  # the job's exclusion list for its next placement
    changed: bool  # it avoids a node the job could use before
    lines: list[str]  # what is excluded, and what is not and why

    @property
    def refused(self) -> list[str]:
        return [line for line in self.lines if line.startswith("not excluding")]


def blame_and_exclude(run_dir: Path, status: int, records: list[dict[str, Any]]) -> Placement | None:
    """On SLURM: blames the nodes this failure points at (ledger), and the job's next exclusion list."""
    job_id = environ.slurm_job_id()
    if job_id is None or status in (0, EXIT_USER_ERROR, EXIT_STOPPED):  # no node's fault
        return None
    try:
        job = ledger.job(job_id)
        ledger.add(run_dir, blames_of(run_dir, status, records, job_id, job.nodes))
        usable = ledger.usable_nodes(job.partitions)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"bfly: cannot read job {job_id}'s placement ({one_line(e)}): no node excluded", file=sys.stderr)
        return None
    mine = [b for b in ledger.read(run_dir) if b.job == job_id]
    user = [n for n in job.excluded if n not in {b.node for b in mine}]  # the job's own --exclude
    cap = ledger.Cap(usable, job.needed, environ.max_excluded_nodes())
    exclusion = ledger.excluded(mine, cap, user, environ.exclude_nodes_by_hand())
    return Placement(exclusion.nodes, set(exclusion.nodes) != set(job.excluded), exclusion.lines(job.excluded))


def blames_of(
    run_dir: Path, status: int, records: list[dict[str, Any]], job_id: str, nodes: tuple[str, ...]
) -> list[ledger.Blame]:
    """A hang: the stalled ranks' nodes (the hang line, in this attempt's train.log or attempts.jsonl); a
    crash: the nodes with hardware-looking errors; either: the stragglers named in this attempt. A failed
    node check has blamed its nodes itself."""
    log = _this_attempts_log(run_dir, job_id)
    hosts = ledger.hosts_of(run_dir, job_id)
    blames = ledger.from_stragglers(log, job_id, nodes, hosts)
    ends = _this_attempts_ends(run_dir, job_id)
    if status == EXIT_HANG:  # every hang of this attempt (torchrun may have restarted after earlier ones)
        hangs = [line for line in log if "hang: " in line and "stalled: " in line]
        hangs += [e.get("detail", "") for e in ends if e.get("ended") == "hang"]
        blames += [b for line in hangs for b in ledger.from_hang(line, job_id, nodes, hosts)]
    if status == EXIT_CRASH:
        step = max((e.get("global_step", 0) for e in ends), default=None)
        blames += ledger.from_crash(records, job_id, nodes, step)
    return blames


def _this_attempts_ends(run_dir: Path, job_id: str) -> list[dict[str, Any]]:
    """Every end record of this job attempt in attempts.jsonl (ranks that failed at once may each write one)."""
    from bfly.job import attempts

    records = []
    with contextlib.suppress(OSError):
        for line in (run_dir / attempts.FILE).read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    restart = str(environ.slurm_restart_count())
    starts = [
        r["attempt"]
        for r in records
        if r.get("event") == "start"
        and r.get("slurm_job_id") == job_id.split("_")[0]
        and (r.get("slurm_restart_count") or "0") == restart
    ]
    return [r for r in records if r.get("event") == "end" and starts and r.get("attempt") == starts[-1]]


def _this_attempts_log(run_dir: Path, job_id: str) -> list[str]:
    """train.log's lines since this job attempt began (log_attempt's line)."""
    try:
        lines = (run_dir / "train.log").read_text(errors="replace").splitlines()
    except OSError:
        return []
    began = f"job {job_id} attempt {environ.slurm_restart_count() + 1}:"
    starts = [i for i, line in enumerate(lines) if began in line]
    return lines[starts[-1] :] if starts else []


# --- the sbatch scripts' side -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in ("begin", "after"):
        print(__doc__, file=sys.stderr)
        return EXIT_USER_ERROR
    when, train_args = argv[0], argv[1:]
    from bfly.core.config import ConfigError, load_config, run_dir_of
    from bfly.core.errors import one_line
    from bfly.job.args import parse_args

    targs = parse_args(train_args)
    try:
        run_dir = run_dir_of(load_config(targs.config, targs.overrides, warn=False))
    except ConfigError as e:
        print(f"bfly: error: {one_line(e)}: not training, not requeueing", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if when == "begin":
        # Records of an earlier attempt must not be read as this one's.
        for old in (run_dir / EXIT_DIR).glob("*") if (run_dir / EXIT_DIR).is_dir() else []:
            old.unlink(missing_ok=True)
        print(f"bfly: {log_attempt(run_dir, torchrun=True)}", file=sys.stderr, flush=True)
        print(run_dir / EXIT_DIR)  # for BFLY_EXIT_STATUS_DIR
        print(environ.max_restarts())
        return 0
    records = exit_records(run_dir / EXIT_DIR)
    status, detail = node_check_status(run_dir / EXIT_DIR) or job_status(records)
    placement = blame_and_exclude(run_dir, status, records)
    decision = after_failure(run_dir, status, detail, placement is not None and placement.changed)
    # What the next placement avoids, and which blamed nodes it cannot avoid and why (even without a requeue).
    lines = [] if placement is None else placement.lines if decision.requeue else placement.refused
    for line in [*lines, decision.reason]:
        print(f"bfly: {line}", file=sys.stderr, flush=True)
    if decision.requeue:
        print("requeue")
        print(",".join(placement.nodes) if placement and placement.changed else "")
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
