"""Submit bfly training to SLURM (or run it here) with submitit.

    python -m launch.submit --nodes 1 --gpus-per-node 4 --cpus-per-task 10 --config configs/resnet50.yaml
    python -m launch.submit --dry-run --gpus-per-node 4 --config configs/resnet50.yaml
    python -m launch.submit --help

Each job runs one task per GPU; each task is one bfly trainer (see launch/job.py). A job that
reaches its time limit or is preempted checkpoints and is requeued, and the run continues in
its run directory. submitit's files (sbatch script, pickles, one log per task) are kept in
<run dir>/submitit; a job array's in <common parent of the run dirs>/submitit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import submitit

from bfly.core.config import flat, to_dict
from bfly.core.errors import one_line
from launch.cluster_args import TrainSpec, UsageError, cpus_per_task, defaults_note, parse, train_specs
from launch.executor import make_executor, sbatch_text
from launch.job import TrainJob


def submission_groups(args: argparse.Namespace, specs: list[TrainSpec]) -> list[tuple[Path, str, list[TrainSpec]]]:
    """(submitit folder, job name, runs) per submission: one per run, or one for a job array."""
    if args.array and len(specs) > 1:
        parent = Path(os.path.commonpath([s.run_dir for s in specs]))
        return [(parent / "submitit", args.job_name or f"bfly-{args.group or parent.name}", specs)]
    return [(s.run_dir / "submitit", args.job_name or f"bfly-{s.name}", [s]) for s in specs]


def data_key(spec: TrainSpec) -> str:
    """What the preflight's image check depends on: the data config and the splits training reads."""
    return json.dumps([dataclasses.asdict(spec.cfg.data), sorted({"train", *spec.cfg.train.eval_splits})])


def preflight(args: argparse.Namespace, specs: list[TrainSpec]) -> bool:
    """bfly.train --check for each run, at the world size the job will have; the images of each
    distinct data config are decoded once. True if all pass."""
    from bfly.job.preflight import preflight as check

    world = args.nodes * args.tasks_per_node
    checked: dict[str, str] = {}  # data key -> the run whose check decoded its images
    ok = True  # every run is checked, so every problem is listed at once
    for spec in specs:
        if len(specs) > 1:
            print(f"# preflight of {spec.name}", flush=True)
        key = data_key(spec)
        ok = check(spec.config, spec.overrides, world, images_checked_by=checked.get(key)) == 0 and ok
        checked.setdefault(key, spec.name)
    return ok


def make_job(args: argparse.Namespace, spec: TrainSpec) -> TrainJob:
    return TrainJob(spec.train_args, str(spec.run_dir), str(Path.cwd()), threads=args.cpus_per_task)


def grid_listing(specs: list[TrainSpec]) -> list[str]:
    """A grid's runs, one line each: run directory name and the values it sets."""
    w = max(len(s.name) for s in specs)
    values = [flat(to_dict(s.cfg)) for s in specs]
    return [f"# {len(specs)} runs, wandb group {specs[0].cfg.wandb.group}:"] + [
        f"#   {s.name:<{w}}  {' '.join(f'{k}={v[k]}' for k in s.cfg.wandb.varies)}" for s, v in zip(specs, values)
    ]


def wandb_line(spec: TrainSpec) -> str:
    c = spec.cfg.wandb
    values = flat(to_dict(spec.cfg))
    varies = ", ".join(f"{k}={values[k]!r}" for k in c.varies)
    return f"group={c.group} job_type={c.job_type} tags={c.tags} varies: {varies}"


def dry_run(args: argparse.Namespace, groups: list[tuple[Path, str, list[TrainSpec]]]) -> None:
    every = [spec for _, _, specs in groups for spec in specs]
    if every[0].cfg.wandb.varies:
        print("\n".join(grid_listing(every)))
    for folder, name, specs in groups:
        print(f"# submitit folder: {folder}")
        for i, spec in enumerate(specs):
            where = f" (array task {i})" if len(specs) > 1 else ""
            print(f"# run directory{where}: {spec.run_dir}")
            print(f"# bfly.train arguments{where}: {' '.join(spec.train_args)}")
            if spec.cfg.wandb.varies:
                print(f"# wandb{where}: {wandb_line(spec)}")
        if args.cluster == "slurm":
            print(sbatch_text(args, folder, name, array_size=len(specs)))
        else:
            print(f"# --cluster {args.cluster}: {args.tasks_per_node} trainer process(es) on this machine, no sbatch\n")


def submit(
    args: argparse.Namespace, groups: list[tuple[Path, str, list[TrainSpec]]]
) -> list[tuple[submitit.Job, TrainSpec]]:
    submitted = []
    for folder, name, specs in groups:
        executor = make_executor(args, folder, name)
        with executor.batch():  # several specs: one job array
            jobs = [executor.submit(make_job(args, spec)) for spec in specs]
        for job, spec in zip(jobs, specs):
            submitted.append((job, spec))
            print_job(job, spec, folder)
    return submitted


def print_job(job: submitit.Job, spec: TrainSpec, folder: Path) -> None:
    print(f"submitted job {job.job_id}: {spec.name}")
    print(f"  run directory: {spec.run_dir}  (train.log, metrics.jsonl, last.pt)")
    print(f"  task logs:     {job.paths.stdout}  (and _log.err; one pair per task)")
    if isinstance(job, submitit.SlurmJob):
        print(f"  status:        squeue -j {job.job_id}   sacct -j {job.job_id}   cancel: scancel {job.job_id}")


def wait(submitted: list[tuple[submitit.Job, TrainSpec]]) -> int:
    failed = 0
    for job, spec in submitted:
        try:
            result = job.results()[0]
        except Exception as e:  # submitit raises the job's own error, or why there is no result
            failed += 1
            print(f"job {job.job_id} ({spec.name}) failed: {str(e).strip()[-2000:]}", file=sys.stderr)
            continue
        last = (result or {}).get("last_epoch") or {}
        top1 = f", valid top1 {last['valid_top1']:.2%}" if "valid_top1" in last else ""
        print(
            f"job {job.job_id} ({spec.name}) done: {(result or {}).get('epochs_done', 0)} epoch(s){top1}; "
            f"run directory {spec.run_dir}"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        specs = train_specs(args, Path.cwd())
    except UsageError as e:
        print(f"launch.submit: error: {e}", file=sys.stderr)
        return 2
    if note := defaults_note(args):
        print(f"launch.submit: warning: {note}", file=sys.stderr)
    if args.cpus_per_task is None:
        args.cpus_per_task = cpus_per_task(specs)
    groups = submission_groups(args, specs)
    if args.check and not preflight(args, specs):
        print("launch.submit: the preflight found problems (listed above): nothing submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(args, groups)
        return 0
    try:
        submitted = submit(args, groups)
    except submitit.core.utils.FailedJobError as e:  # sbatch refused it: a partition, account or GPU request
        print(f"launch.submit: error: nothing submitted, sbatch refused the job: {one_line(str(e))}", file=sys.stderr)
        return 2
    group = specs[0].cfg.wandb.group
    status = wait(submitted) if args.wait or args.cluster != "slurm" else 0
    if len(specs) > 1 and group:
        root = os.path.commonpath([s.run_dir for s in specs])
        print(f"report (mean ± std over seeds): python -m bfly.report --group {group} --root {root}")
    return status


if __name__ == "__main__":
    sys.exit(main())
