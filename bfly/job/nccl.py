"""NCCL's own watchdog, made explicit and consistent with bfly's (bfly.job.watchdog)."""

from __future__ import annotations

from pathlib import Path

from bfly.core.env import set_defaults


def nccl_settings(run_dir: Path, timeout_s: int) -> dict[str, str]:
    """NCCL's own watchdog, made explicit and consistent with bfly's: a collective that does not finish
    within dist.timeout_s tears the process down (async error handling, the default made explicit), with
    the flight recorder's record of the last collectives dumped into run.dir/hang/ first; the monitor
    that kills a process whose NCCL watchdog itself is stuck waits a minute longer. bfly's watchdog
    (run.hang_timeout_s, below dist.timeout_s) normally names the hang first and saves the flight
    recorder's record itself (dump_nccl_trace)."""
    trace = str(run_dir / "hang" / "nccl-trace-rank")  # NCCL appends the rank
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # tear down the process on a failed or timed-out collective
        "TORCH_NCCL_BLOCKING_WAIT": "0",  # the watchdog, not a blocking wait, times collectives out
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # flight recorder: the last 2000 collectives
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": trace,
        "TORCH_FR_DUMP_TEMP_FILE": trace,
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(timeout_s + 60),
    }


def configure_nccl(run_dir: Path, timeout_s: int) -> dict[str, str]:
    """Before the NCCL process group starts; a variable the user set wins. Returns the settings in effect."""
    (run_dir / "hang").mkdir(parents=True, exist_ok=True)
    return set_defaults(nccl_settings(run_dir, timeout_s))


def dump_nccl_trace(path: Path) -> bool:
    """The NCCL flight recorder's record of this process's collectives (readable with torch's
    `torchfrtrace`); False without NCCL."""
    try:
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_backend() == "nccl"):
            return False
        from torch._C import _distributed_c10d

        path.write_bytes(_distributed_c10d._dump_nccl_trace())  # type: ignore[attr-defined]
        return True
    except Exception:  # a diagnostic: never in the way of ending the job
        return False
