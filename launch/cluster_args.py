"""Command line of `python -m launch.submit`: cluster flags; the rest is the training config.

Every flag here is about where and how the job runs. What it trains is `--config` plus
`section.key=value` overrides, exactly as `python -m bfly.train` takes them; they are checked
here, before anything is queued.
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bfly.core.cli import show_defaults
from bfly.core.config import Config, ConfigError, load_config, parse_override, run_dir_of
from launch.grid import GridError, axes, default_group, expand, run_overrides, safe

CLUSTERS = ("slurm", "local", "debug")

EXAMPLES = """examples:
  # ResNet50 on 2 nodes x 8 GPUs, requeued every 24 h until done
  python -m launch.submit --nodes 2 --gpus-per-node 8 --cpus-per-task 10 --partition gpu \\
      --config configs/resnet50.yaml
  # VGG19-BN against ResNet50: one job each, one wandb group
  python -m launch.submit --gpus-per-node 4 --config configs/vgg19_bn.yaml --config configs/resnet50.yaml
  # the same as one job array
  python -m launch.submit --gpus-per-node 4 --array --config configs/vgg19_bn.yaml --config configs/resnet50.yaml
  # a grid: 2 learning rates x 2 models x 3 seeds = 12 runs in one job array, then mean +- std over seeds
  python -m launch.submit --gpus-per-node 4 --array --group lr-model --sweep optim.lr=0.05,0.1 \\
      --sweep model.name=resnet50,vgg19_bn --seeds 0,1,2 --config configs/resnet50.yaml
  python -m bfly.report --group lr-model
  # what would be submitted
  python -m launch.submit --dry-run --gpus-per-node 4 --config configs/resnet50.yaml
  # check config and data (every image decoded) here, then submit
  python -m launch.submit --check --gpus-per-node 4 --config configs/resnet50.yaml
  # the same job on this machine, 2 CPU processes, no SLURM
  python -m launch.submit --cluster local --gpus-per-node 0 --tasks-per-node 2 --config configs/demo_cpu.yaml
"""


# CPUs per trainer on the cached input (no loader workers): the trainer and its copy thread, and
# threads to decode the image cache when it is built.
CACHED_INPUT_CPUS = 4


class UsageError(ValueError):
    pass


@dataclass(frozen=True)
class TrainSpec:
    """One training run: what bfly.train gets (config file and overrides, run.dir included), its run
    directory and the resolved config."""

    name: str
    config: str | None  # absolute path
    overrides: list[str]
    run_dir: Path
    cfg: Config

    @property
    def train_args(self) -> list[str]:
        return (["--config", self.config] if self.config else []) + self.overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.submit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit bfly training to SLURM with submitit: one task per GPU, checkpoint and "
        "requeue on time limit or preemption.",
        epilog=EXAMPLES,
    )
    for add_group in (_where_it_runs, _resources, _several_runs, _output, _training):
        add_group(p)
    return p


def _where_it_runs(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("where it runs")
    where.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm; local: the same tasks as processes on this machine; debug: in this process",
    )
    where.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    where.add_argument("--account", help="SLURM account")
    where.add_argument("--qos", help="SLURM quality of service")
    where.add_argument("--constraint", help="SLURM node features, e.g. 'h100|a100'")


def _resources(p: argparse.ArgumentParser) -> None:
    size = p.add_argument_group("resources")
    size.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    size.add_argument(
        "--gpus-per-node",
        type=int,
        default=1,
        help="GPUs per node, one task (trainer) each; 0 for a CPU job (default: 1)",
    )
    size.add_argument(
        "--tasks-per-node", type=int, help="trainers per node (default: --gpus-per-node; CPU jobs must set it)"
    )
    size.add_argument(
        "--cpus-per-task",
        type=int,
        help=f"CPUs per trainer (default: data.workers + 1 on the PIL input, {CACHED_INPUT_CPUS} on the cached input)",
    )
    size.add_argument("--mem-gb", type=float, help="memory per node in GB (default: the cluster's default)")
    size.add_argument(
        "--time",
        default="24:00:00",
        help="time limit of one job, minutes or [D-]HH:MM[:SS] (default: 24:00:00); the run continues in requeued jobs",
    )
    size.add_argument(
        "--signal-delay-s",
        type=int,
        default=300,
        help="seconds before the time limit at which the job checkpoints and requeues (default: 300)",
    )
    size.add_argument(
        "--max-requeues",
        type=int,
        default=50,
        help="time-limit requeues allowed per run (submitit's max_num_timeout; preemptions do not count) (default: 50)",
    )
    size.add_argument("--job-name", help="SLURM job name (default: bfly-<run directory name>)")


def _several_runs(p: argparse.ArgumentParser) -> None:
    sweep = p.add_argument_group("several runs")
    sweep.add_argument("--array", action="store_true", help="submit several runs as one SLURM job array")
    sweep.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="train every value of a config key (repeat it for a grid: every combination is one run)",
    )
    sweep.add_argument("--seeds", metavar="0,1,2", help="train every run with each of these train.seed values (or 0-4)")
    sweep.add_argument(
        "--group",
        help="wandb group of the runs; a grid's runs train in runs/<group>/ (default for several runs: named "
        "from what varies and a hash of the command line, e.g. lr-name-seed-1a2b3c4d: the same command resumes)",
    )


def _output(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--dry-run", action="store_true", help="print the sbatch file and run directories; submit nothing")
    out.add_argument(
        "--check",
        action="store_true",
        help="first run bfly's preflight for each run here (python -m bfly.train --check: config, every "
        "image decoded, the plan); submit nothing if it finds a problem",
    )
    out.add_argument(
        "--wait",
        action="store_true",
        help="wait for the jobs and print their results (always on for --cluster local/debug)",
    )


def _training(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training (passed to bfly.train)")
    train.add_argument(
        "--config", action="append", default=[], help="training config YAML; repeat it to submit several runs"
    )
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, applied to every config (python -m bfly.train --help lists the keys)",
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = show_defaults(build_parser()).parse_intermixed_args(argv)
    args.timeout_min = parse_time(args.time)
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    positive = {"--nodes": args.nodes, "--tasks-per-node": args.tasks_per_node, "--signal-delay-s": args.signal_delay_s}
    for flag, value in positive.items():
        if value < 1:
            hint = " (a CPU job needs --tasks-per-node N)" if flag == "--tasks-per-node" else ""
            raise UsageError(f"{flag} must be >= 1, got {value}{hint}")
    if args.gpus_per_node < 0 or args.max_requeues < 0:
        raise UsageError("--gpus-per-node and --max-requeues must be >= 0")
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        raise UsageError(
            f"one task per GPU: --tasks-per-node {args.tasks_per_node} must equal "
            f"--gpus-per-node {args.gpus_per_node} (or be left out)"
        )
    if args.signal_delay_s >= args.timeout_min * 60:
        raise UsageError(f"--signal-delay-s {args.signal_delay_s} must be shorter than --time {args.time}")
    if args.cluster != "slurm" and args.nodes != 1:
        raise UsageError(f"--cluster {args.cluster} runs on this machine: --nodes must be 1")
    if args.cluster == "debug" and args.tasks_per_node != 1:
        raise UsageError(
            "--cluster debug runs one trainer in this process: use --tasks-per-node 1 (or --cluster local)"
        )
    if args.array and args.cluster != "slurm":
        raise UsageError("--array needs --cluster slurm")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if args.cluster == "slurm" and not args.dry_run and missing:
        raise UsageError(
            f"no SLURM on this machine ({' and '.join(missing)} not found): submit from the cluster's login node, "
            "print what would be submitted with --dry-run, or run the same tasks here with --cluster local"
        )


def parse_time(text: str) -> int:
    """Minutes from SLURM's time formats: M, H:M:S, D-H, D-H:M, D-H:M:S (and H:M as minutes:seconds)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UsageError(f"--time {text!r}: expected minutes or [D-]HH:MM[:SS]")
    days, b, c = (int(x) if x else None for x in m.group(1, 3, 4))
    a = int(m.group(2))  # the one group the pattern requires
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif b is not None and c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds < 60:
        raise UsageError(f"--time {text!r}: at least one minute")
    return -(-seconds // 60)


def _load(config: str | None, overrides: list[str]) -> Config:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def train_specs(args: argparse.Namespace, cwd: Path) -> list[TrainSpec]:
    """One spec per --config (or one without a config file), or per run of a --sweep/--seeds grid,
    validated, with an absolute run.dir."""
    try:
        grid = axes(args.sweep, args.seeds)
    except GridError as e:
        raise UsageError(str(e)) from None
    both = [o.partition("=")[0] for o in args.overrides if o.partition("=")[0] in grid]
    if both:
        raise UsageError(f"{both[0]} is both set ({both[0]}=...) and swept: keep one")
    configs = args.config or [None]
    group = args.group
    if group is None and (len(configs) > 1 or grid):
        given = [parse_override(o)[1] for o in args.overrides if o.startswith("wandb.group=")]
        group = str(given[-1]) if given else default_group(configs, grid, args.overrides)
    specs, labels = [], []  # labels: how the command line names each run
    if grid:
        for run in expand(configs, grid):
            base = _load(run.config, args.overrides)
            root = base.run.dir if any(o.startswith("run.dir=") for o in args.overrides) else ""
            run_dir = (cwd / (root or f"runs/{safe(str(group))}") / run.name).resolve()
            overrides = [*args.overrides, *run_overrides(run, str(group), base.wandb.tags), f"run.dir={run_dir}"]
            specs.append(_spec(run.name, run.config, overrides, run_dir, cwd))
            labels.append(
                " ".join([*([run.config] if run.config else []), *(f"{k}={v}" for k, v in run.values.items())])
            )
    else:
        for config in configs:
            overrides = list(args.overrides) + ([f"wandb.group={group}"] if group else [])
            run_dir = (cwd / run_dir_of(_load(config, overrides))).resolve()
            specs.append(_spec(run_dir.name, config, overrides + [f"run.dir={run_dir}"], run_dir, cwd))
            labels.append(str(config))
    hint = "run directory names keep letters, digits and . + - only" if grid else "give each config its own run.dir"
    seen: dict[Path, str] = {}
    for spec, label in zip(specs, labels):
        if spec.run_dir in seen:
            raise UsageError(f"{seen[spec.run_dir]} and {label} would both train into {spec.run_dir}: {hint}")
        seen[spec.run_dir] = label
    return specs


def cpus_per_task(specs: list[TrainSpec]) -> int:
    """CPUs each task (one trainer) needs by its config: its loader workers and itself on the PIL input."""
    return max(s.cfg.data.workers + 1 if s.cfg.data.input == "pil" else CACHED_INPUT_CPUS for s in specs)


def defaults_note(args: argparse.Namespace) -> str | None:
    """Without --config every run trains the built-in defaults: say what they are."""
    if args.config:
        return None
    cfg = Config()
    return (
        f"no --config: training the built-in defaults ({cfg.model.name}, data.root={cfg.data.root}, "
        f"{cfg.train.epochs} epochs at {cfg.data.image_size} px, with the overrides given); "
        "python -m bfly.train --print-config shows them all"
    )


def _spec(name: str, config: str | None, overrides: list[str], run_dir: Path, cwd: Path) -> TrainSpec:
    path = str((cwd / config).resolve()) if config else None
    return TrainSpec(name, path, overrides, run_dir, _load(path, overrides))
