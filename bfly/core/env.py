"""Everything bfly reads from the process environment, in one place.

torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, ...) win over SLURM's: under `srun torchrun`
SLURM describes the torchrun process, not the worker. SLURM's are used only when a job step starts
the trainer directly (`srun python -m bfly.train`), one task per process.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    source: str  # "torchrun" | "slurm" | "single"
    init_method: str  # "env://" or a tcp:// address

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def dist_env() -> DistEnv:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = _int("WORLD_SIZE")
        return DistEnv(
            rank=_int("RANK"),
            local_rank=_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0,
            world_size=world,
            local_world_size=_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world,
            source="torchrun",
            init_method="env://",
        )
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return _slurm_env()
    return DistEnv(0, 0, 1, 1, "single", "env://")


def world_size_hint() -> int | None:
    """WORLD_SIZE on its own (no RANK): how many processes a run checked beforehand will have."""
    return _int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else None


def _slurm_env() -> DistEnv:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"running as a SLURM task without torchrun, but {name} is not set: export MASTER_ADDR "
                "(the first host of the allocation) and MASTER_PORT in the sbatch script"
            )
    return DistEnv(
        rank=_int("SLURM_PROCID"),
        local_rank=_int("SLURM_LOCALID"),
        world_size=_int("SLURM_NTASKS"),
        local_world_size=_int("SLURM_NTASKS_PER_NODE") if "SLURM_NTASKS_PER_NODE" in os.environ else 1,
        source="slurm",
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{_int('MASTER_PORT')}",
    )


def slurm_job_id() -> str | None:
    """The job id a requeued job keeps (array jobs: ARRAYJOBID_TASKID)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


# What identifies this start of a job: SLURM's job, array and restart ids (SLURM_RESTART_COUNT grows with each
# requeue) and torchrun's restart count (TORCHELASTIC_RESTART_COUNT grows with each restart under --max-restarts).
_LAUNCH_ID_VARS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
    "torchrun_restart_count": "TORCHELASTIC_RESTART_COUNT",
}


def slurm_ids() -> dict[str, str]:
    """The SLURM ids of this job as SLURM sets them: job, array job and array task (those that are set)."""
    keys = ("slurm_job_id", "slurm_array_job_id", "slurm_array_task_id")
    return {key: os.environ[_LAUNCH_ID_VARS[key]] for key in keys if os.environ.get(_LAUNCH_ID_VARS[key])}


def slurm_job_start_time() -> float | None:
    """When SLURM started this allocation (SLURM_JOB_START_TIME, unix time; SLURM 23.02 and later): after a
    requeue, the time the job waited in the queue ends there."""
    value = os.environ.get("SLURM_JOB_START_TIME")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def launch_ids() -> dict[str, str | None]:
    """Every id of this start of a job (see _LAUNCH_ID_VARS); None where unset."""
    return {key: os.environ.get(name) for key, name in _LAUNCH_ID_VARS.items()}


def proxy_for(url: str) -> str | None:
    """The proxy an HTTP client takes to `url` (https_proxy / http_proxy, unless no_proxy covers its host)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname and urllib.request.proxy_bypass(parsed.hostname):
        return None
    return urllib.request.getproxies_environment().get(parsed.scheme)


def wandb_api_key_configured() -> bool:
    """True when wandb could log online: a key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode_override() -> str | None:
    """WANDB_MODE set by the user wins over the config's mode, as wandb itself does."""
    return os.environ.get("WANDB_MODE") or None


def wandb_mode_setting(config_mode: str) -> str:
    """Where the wandb mode comes from, as the user wrote it: `WANDB_MODE=x` or `wandb.mode=x`."""
    override = wandb_mode_override()
    return f"WANDB_MODE={override}" if override else f"wandb.mode={config_mode}"


def elastic_error_file() -> Path | None:
    """TORCHELASTIC_ERROR_FILE: where torchrun's agent reads a worker's error for its failure summary
    (set for each worker; empty or unset: no summary to write to)."""
    value = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return Path(value) if value else None


def agent_serves_store() -> bool:
    """torchrun's agent serves the workers' TCPStore (its default). Otherwise (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    SLURM tasks without torchrun) rank 0's process serves it."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def stdout_is_tty() -> bool:
    return os.isatty(1) and os.environ.get("TERM", "") != "dumb"


# --- retries (bfly.retry) -----------------------------------------------------------------------------


def _int_or(name: str, default: int) -> int:
    return _int(name) if os.environ.get(name, "") != "" else default


def max_restarts() -> int:
    """BFLY_MAX_RESTARTS: torchrun restarts of the trainers inside one job (our sbatch scripts' --max-restarts)."""
    return _int_or("BFLY_MAX_RESTARTS", 2)


def max_failures() -> int:
    """BFLY_MAX_FAILURES: how often a job that failed (crash or hang) is requeued."""
    return _int_or("BFLY_MAX_FAILURES", 3)


def restart_count() -> tuple[int, int]:
    """(restarts so far, allowed) of this torchrun agent's trainers: (0, 0) outside torchrun."""
    return _int_or("TORCHELASTIC_RESTART_COUNT", 0), _int_or("TORCHELASTIC_MAX_RESTARTS", 0)


def elastic_run_id() -> str | None:
    """TORCHELASTIC_RUN_ID: torchrun's rendezvous id (--rdzv-id; a fresh one per --standalone torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def slurm_restart_count() -> int:
    """How often SLURM has requeued this job (0 on its first run)."""
    return _int_or("SLURM_RESTART_COUNT", 0)


def exit_status_dir() -> Path | None:
    """BFLY_EXIT_STATUS_DIR: where each trainer records its exit status for the launcher's retry decision
    (set by our sbatch scripts; unset, nothing is recorded)."""
    value = os.environ.get("BFLY_EXIT_STATUS_DIR")
    return Path(value) if value else None


def store_address(env: DistEnv) -> tuple[str, int] | None:
    """host, port of the store every rank of this job reaches at start-up (torchrun's or rank 0's): the
    rendezvous address. None when there is none (a single process)."""
    if not env.distributed:
        return None
    if env.init_method.startswith("tcp://"):
        host, _, port = env.init_method[len("tcp://") :].rpartition(":")
        return host, int(port)
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], _int("MASTER_PORT")
    return None


def restart_store_shared() -> bool:
    """torchrun lets its restarted workers reuse its rendezvous store unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1;
    a restart can then hang in the rendezvous (pytorch#135712)."""
    return os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "") != "1"


def set_defaults(values: dict[str, str]) -> dict[str, str]:
    """Sets each variable the user has not set (torch reads them when a process group starts); returns the
    values in effect, the user's own included."""
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in values}


# --- test faults (bfly.job.faults) ---------------------------------------------------------------------


@dataclass(frozen=True)
class StallHook:
    rank: int
    phase: str  # startup | data | eval | checkpoint
    from_step: int | None  # None: every time the phase is entered; else once, at the first global step >= it
    seconds: float


@dataclass(frozen=True)
class FaultSpec:
    """The faults a test asks a trainer to fake (none in normal use):

    * BFLY_TEST_STALL=<rank>:<phase>:<step>:<seconds>[,...]: the trainer of <rank> sleeps <seconds> in <phase>
      (startup: before the rendezvous; data: waiting for its next batch; eval: before an evaluation batch;
      checkpoint: while writing one), once at the first global step >= <step>, or each time with <step> `*`.
      For tests of hung, slow and stopped ranks.
    * BFLY_TEST_SLOW_RANK=<rank>:<seconds>: that rank waits <seconds> more for each training batch, as a rank
      on a slow disk or a busy node would (a straggler for bfly.run.health to find).
    * BFLY_TEST_PAUSE_CHECKPOINT=<file>: the first write that replaces an existing last.pt pauses half-way (its
      temp file partly written), creates <file> and waits for the process to be killed (at most 120 s, then
      goes on). Once per file: a write that finds <file> already there does not pause, so the restarted job
      goes on. For tests that kill a process during a checkpoint write.
    """

    stalls: tuple[StallHook, ...] = ()
    slow_rank: tuple[int, float] | None = None  # (rank, seconds per batch)
    pause_checkpoint: Path | None = None


def fault_spec() -> FaultSpec:
    """The test faults requested in the environment (FaultSpec)."""
    stalls = []
    for item in filter(None, os.environ.get("BFLY_TEST_STALL", "").split(",")):
        rank, phase, step, seconds = item.split(":")
        stalls.append(StallHook(int(rank), phase, None if step == "*" else int(step), float(seconds)))
    slow = os.environ.get("BFLY_TEST_SLOW_RANK")
    pause = os.environ.get("BFLY_TEST_PAUSE_CHECKPOINT")
    return FaultSpec(tuple(stalls), _slow_rank(slow) if slow else None, Path(pause) if pause else None)


def _slow_rank(value: str) -> tuple[int, float]:
    rank, _, seconds = value.partition(":")
    try:
        return int(rank), float(seconds)
    except ValueError:
        raise RuntimeError(f"BFLY_TEST_SLOW_RANK={value!r}: expected <rank>:<seconds>") from None


# --- nodes: the node check (bfly.nodecheck) and the suspect-node ledger (bfly/job/ledger.py) -------------


def slurm_node_name() -> str | None:
    """SLURMD_NODENAME: the name SLURM knows this node by (a job step's task); None outside SLURM."""
    return os.environ.get("SLURMD_NODENAME") or None


def slurm_task() -> tuple[int, int, int] | None:
    """(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) of a job step's task; None outside a job step."""
    if "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return None
    return _int("SLURM_PROCID"), _int("SLURM_NTASKS"), _int_or("SLURM_LOCALID", 0)


def slurm_nodelist() -> str | None:
    """The nodes of this job step (SLURM_STEP_NODELIST), else of the job (SLURM_JOB_NODELIST), as SLURM
    writes them (`n[1-2]`)."""
    return os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or None


def slurm_gpus_on_node() -> int | None:
    """SLURM_GPUS_ON_NODE: the GPUs SLURM allocated on this node; None when it allocated none."""
    return _int("SLURM_GPUS_ON_NODE") if os.environ.get("SLURM_GPUS_ON_NODE", "") != "" else None


def exclude_nodes_by_hand() -> list[str]:
    """BFLY_EXCLUDE_NODES=n3,n7: nodes a requeued job of this run must avoid, whatever the ledger says."""
    return [n.strip() for n in os.environ.get("BFLY_EXCLUDE_NODES", "").split(",") if n.strip()]


def max_excluded_nodes() -> int:
    """BFLY_MAX_EXCLUDED_NODES: the most nodes the suspect-node ledger excludes from one job (default 4)."""
    return _int_or("BFLY_MAX_EXCLUDED_NODES", 4)


def node_faults_for_test() -> str:
    """Test hook, BFLY_TEST_NODE_FAULT=<node>:<fault>=<value>[;...]: what bfly.nodecheck sees on <node> is
    changed (bfly/job/faults.py lists the faults). For tests of a node that differs from the others."""
    return os.environ.get("BFLY_TEST_NODE_FAULT", "")
