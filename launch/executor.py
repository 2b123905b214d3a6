"""submitit executor set-up from the cluster flags, and the sbatch text a submission would use."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import submitit


def generic_parameters(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """submitit's cluster-independent parameters (AutoExecutor translates them)."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": args.timeout_min,
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
    }
    if args.gpus_per_node > 0:  # a CPU job must not ask for GPUs: clusters without GRES reject it
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    return params


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """SLURM-only parameters, in SlurmExecutor's names."""
    params: dict[str, Any] = {
        "signal_delay_s": args.signal_delay_s,
        # Sites with JobRequeue=0 refuse `scontrol requeue` unless the job allows it.
        "additional_parameters": {"requeue": True},
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def make_executor(args: argparse.Namespace, folder: Path, name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    params = generic_parameters(args, name)
    if args.cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in slurm_parameters(args).items()})
    else:  # local/debug take no CPU or memory requests
        params = {k: v for k, v in params.items() if k not in ("cpus_per_task", "mem_gb")}
    executor.update_parameters(**params)
    return executor


class _SlurmTextOnly(submitit.SlurmExecutor):
    """SlurmExecutor that also works where SLURM is not installed; only used to render the sbatch file."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def sbatch_text(args: argparse.Namespace, folder: Path, name: str, array_size: int = 1) -> str:
    """The sbatch file submitit would write for this submission (what AutoExecutor does, step by step)."""
    executor = _SlurmTextOnly(folder=folder, max_num_timeout=args.max_requeues)
    params = executor._convert_parameters(generic_parameters(args, name))
    executor.update_parameters(**params, **slurm_parameters(args))
    if array_size > 1:
        executor.parameters["map_count"] = array_size  # as SlurmExecutor does for a batch
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")
