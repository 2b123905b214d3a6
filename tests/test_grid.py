"""Spec of grids and seeds: `launch.submit --sweep ... --seeds ...` and `bfly.report --group`.

The dry runs check the expansion (names, counts, what each run gets); a real grid of 4 runs goes
through `--cluster local` on the mini data with wandb offline, and its run directories are the
input of the report's mean ± std over seeds.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("submitit")

from launch.cluster_args import UsageError
from launch.submit import main as submit

from conftest import PYTHON, REPO, read_jsonl, run_python, subprocess_env, tiny_dataset, tiny_overrides

CPU = ["--gpus-per-node", "0", "--tasks-per-node", "1"]
GRID = ["--sweep", "optim.lr=0.05,0.1", "--sweep", "model.name=resnet50,vgg19_bn", "--seeds", "0,1,2"]


def listed(out: str, what: str) -> list[str]:
    """The values of the dry run's `# <what> (array task i): value` (or `# <what>: value`) lines."""
    return [m.group(1) for m in re.finditer(rf"^# {re.escape(what)}(?: \(array task \d+\))?: (.*)$", out, re.M)]


def dry_run(argv: list[str], capsys) -> str:
    assert submit(["--dry-run", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


# --- expansion -------------------------------------------------------------------------------------------


def test_a_2x2x3_grid_is_one_job_array_of_12_runs_named_from_what_varies(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = dry_run([*CPU, "--array", "--group", "lr-model", *GRID, "wandb.mode=offline"], capsys)

    names = [
        f"lr-{lr}_name-{model}_seed-{seed}"
        for lr in ("0.05", "0.1")
        for model in ("resnet50", "vgg19_bn")
        for seed in (0, 1, 2)
    ]
    assert listed(out, "run directory") == [f"{tmp_path}/runs/lr-model/{n}" for n in names]
    assert out.count("#!/bin/bash") == 1 and "#SBATCH --array=0-11" in out
    assert f"#SBATCH --output={tmp_path}/runs/lr-model/submitit/%A_%a_0_log.out" in out
    assert "#SBATCH --job-name=bfly-lr-model" in out
    # The listing: one line per run with the values it sets.
    assert f"#   {names[4]}  optim.lr=0.05 model.name=vgg19_bn train.seed=1" in out.splitlines()

    for name, args, wandb in zip(names, listed(out, "bfly.train arguments"), listed(out, "wandb")):
        lr, model, seed = re.fullmatch(r"lr-(.+)_name-(.+)_seed-(\d)", name).groups()
        assert f"optim.lr={lr} model.name={model} train.seed={seed} " in args
        assert args.endswith(f"run.dir={tmp_path}/runs/lr-model/{name}")
        assert wandb == (
            f"group=lr-model job_type=lr-{lr}_name-{model} "
            f"tags=['optim.lr={lr}', 'model.name={model}', 'train.seed={seed}'] "
            f"varies: optim.lr={float(lr)!r}, model.name={model!r}, train.seed={seed}"
        )
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_the_same_grid_without_array_is_one_job_per_run(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = dry_run([*CPU, "--group", "g", "--sweep", "optim.lr=0.05,0.1", "--seeds", "0-1"], capsys)
    assert out.count("#!/bin/bash") == 4 and "--array" not in out
    assert listed(out, "submitit folder") == [
        f"{tmp_path}/runs/g/{n}/submitit"
        for n in ("lr-0.05_seed-0", "lr-0.05_seed-1", "lr-0.1_seed-0", "lr-0.1_seed-1")
    ]


def test_names_are_predictable_and_safe_and_never_shared(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = [*CPU, "--group", "splits", "--sweep", "train.eval_splits=[valid],[valid,test]", "run.dir=sweeps/x"]
    first = dry_run(argv, capsys)
    assert first == dry_run(argv, capsys)  # the same command line, the same runs
    assert listed(first, "run directory") == [
        f"{tmp_path}/sweeps/x/eval_splits-valid",
        f"{tmp_path}/sweeps/x/eval_splits-valid_test",
    ]
    # Two values that differ only in characters a file name cannot hold are refused, not merged.
    assert submit(["--dry-run", *CPU, "--sweep", "wandb.notes=a/b,a b"]) == 2
    assert "wandb.notes=a/b and wandb.notes=a b would both train into" in capsys.readouterr().err
    # wandb takes tags of at most 64 characters.
    out = dry_run([*CPU, "--sweep", f"wandb.notes={'n' * 70},short"], capsys)
    assert f"'wandb.notes={'n' * 49}...'" in listed(out, "wandb")[0]
    # A group is generated for a grid: named from what varies, the same for the same command (it resumes).
    out = dry_run([*CPU, "--seeds", "3"], capsys)
    assert re.fullmatch(rf"{tmp_path}/runs/seed-[0-9a-f]{{8}}/seed-3", listed(out, "run directory")[0])
    assert listed(dry_run([*CPU, "--seeds", "3"], capsys), "run directory") == listed(out, "run directory")
    other = dry_run([*CPU, "--seeds", "3", "train.epochs=2"], capsys)
    assert Path(listed(other, "run directory")[0]).parent != Path(listed(out, "run directory")[0]).parent


def test_several_configs_are_one_more_dimension(capsys, monkeypatch):
    configs = ["--config", "configs/vgg19.yaml", "--config", "configs/resnet50.yaml"]
    monkeypatch.chdir(REPO)
    out = dry_run([*CPU, "--group", "cmp", *configs, "--seeds", "0,1"], capsys)
    assert [Path(d).name for d in listed(out, "run directory")] == [
        "vgg19_seed-0",
        "vgg19_seed-1",
        "resnet50_seed-0",
        "resnet50_seed-1",
    ]
    assert [w.split()[1] for w in listed(out, "wandb")] == ["job_type=vgg19"] * 2 + ["job_type=resnet50"] * 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sweep", "optim.lr"], "expected section.key=value1,value2"),
        (["--sweep", "optim.lr=0.1,0.1"], "a value is listed twice"),
        (["--sweep", "optim.lr=0.1", "--sweep", "optim.lr=0.2"], "--sweep optim.lr is given twice"),
        (["--seeds", "0,x"], "expected seeds such as 0,1,2 or 0-4"),
        (["--seeds", "0", "--sweep", "train.seed=1,2"], "--seeds and --sweep train.seed both set the seed"),
        (["--sweep", "optim.lrr=0.1,0.2"], "unknown config key 'optim.lrr'"),
        (["--sweep", "optim.lr=0.1,-1"], "optim.lr: must be > 0, got -1"),
        (["--sweep", "optim.lr=0.1,0.2", "optim.lr=0.3"], "optim.lr is both set (optim.lr=...) and swept"),
    ],
)
def test_bad_grids_are_refused_before_anything_is_queued(flags, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert submit(["--dry-run", *CPU, *flags]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(UsageError):
        from launch.cluster_args import parse, train_specs

        train_specs(parse([*CPU, *flags]), tmp_path)


def test_check_decodes_each_distinct_data_config_once(tiny_data, tmp_path, capsys):
    other = tiny_dataset(tmp_path / "other", {"train": 2, "valid": 1, "test": 1})
    argv = [
        "--check",
        "--dry-run",
        "--cluster",
        "local",
        *CPU,
        "--sweep",
        f"data.root={tiny_data},{other}",
        "--seeds",
        "0,1",
        *[o for o in tiny_overrides(tiny_data, tmp_path / "grid") if not o.startswith("data.root=")],
    ]
    assert submit(argv) == 0
    out = capsys.readouterr().out
    images = [line for line in out.splitlines() if line.lstrip().startswith("images")]
    assert len(images) == 4
    assert "80 of train, valid opened and decoded" in images[0]
    assert "30 of train, valid opened and decoded" in images[2]
    seed0 = re.findall(r"^# preflight of (\S+)", out, re.M)
    assert images[1].endswith(f"the same data as {seed0[0]}: checked there")
    assert images[3].endswith(f"the same data as {seed0[2]}: checked there")
    assert out.count("preflight: ok") == 4


# --- a real grid on this machine, and its report ------------------------------------------------------------


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory) -> dict:
    """2 learning rates x 2 seeds through `--cluster local`: 4 real runs, wandb offline. 20 train images
    (2 steps per epoch), 2 epochs."""
    base = tmp_path_factory.mktemp("grid")
    data = tiny_dataset(base / "data", {"train": 2, "valid": 1})
    wandb_dirs = {
        name: base / name.lower() for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")
    }
    for path in wandb_dirs.values():
        path.mkdir()
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", **{k: str(v) for k, v in wandb_dirs.items()})
    overrides = [o for o in tiny_overrides(data, base / "unused") if not o.startswith(("run.dir=", "optim.lr="))]
    overrides.append("train.batch_size=10")
    cmd = [PYTHON, "-m", "launch.submit", "--cluster", "local", *CPU, "--cpus-per-task", "1", "--time", "10"]
    cmd += ["--group", "lr-grid", "--sweep", "optim.lr=0.05,0.2", "--seeds", "0,1", *overrides, "wandb.samples=0"]
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {"base": base, "out": out.stdout, "wall_s": wall, "cpu_s": used}


NAMES = ["lr-0.05_seed-0", "lr-0.05_seed-1", "lr-0.2_seed-0", "lr-0.2_seed-1"]


@pytest.mark.slow
def test_a_grid_of_4_runs_trains_on_this_machine(local_grid):
    runs = local_grid["base"] / "runs" / "lr-grid"
    print(f"4-run local grid: {local_grid['wall_s']:.0f} s wall, {local_grid['cpu_s']:.0f} s CPU")
    for name in NAMES:
        assert re.search(
            rf"job \d+ \({name}\) done: 2 epoch\(s\), valid top1 [\d.]+%; run directory {runs / name}",
            local_grid["out"],
        )
        assert [r["epoch"] for r in read_jsonl(runs / name / "metrics.jsonl")] == [0, 1]
    assert f"python -m bfly.report --group lr-grid --root {runs}" in local_grid["out"]
    # Different seeds train differently.
    first = [read_jsonl(runs / n / "metrics.jsonl")[0]["train_loss"] for n in NAMES]
    assert first[0] != first[1]


@pytest.mark.slow
def test_each_run_of_the_grid_is_one_wandb_run_of_the_group(local_grid):
    from test_wandb import wandb_runs

    runs = local_grid["base"] / "runs" / "lr-grid"
    for name in NAMES:
        lr, seed = re.fullmatch(r"lr-(.+)_seed-(\d)", name).groups()
        (job,) = wandb_runs(runs / name)
        assert job.run.run_group == "lr-grid"
        assert job.run.job_type == f"lr-{lr}"
        assert list(job.run.tags) == [f"optim.lr={lr}", f"train.seed={seed}"]
        assert job.config["varies"] == {"optim.lr": float(lr), "train.seed": int(seed)}
        assert job.config["optim"]["lr"] == float(lr) and job.config["train"]["seed"] == int(seed)
        assert job.exit_code == 0


def report_rows(md: str) -> dict[str, list[str]]:
    rows = [ln for ln in md.splitlines() if ln.startswith("| optim.lr=")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)}


@pytest.mark.slow  # trains the 4-run grid (about 40 s)
def test_report_gives_mean_and_std_over_seeds_of_the_group(local_grid, tmp_path):
    from test_report import assert_png

    runs = local_grid["base"] / "runs" / "lr-grid"
    out = tmp_path / "report"
    cmd = ["-m", "bfly.report", "--group", "lr-grid", "--root", str(local_grid["base"] / "runs")]
    done = run_python(*cmd, "--out", str(out), "--confusion", "none", timeout=300)
    assert done.returncode == 0, done.stderr
    md = (out / "summary.md").read_text()
    rows = report_rows(md)
    assert list(rows) == ["optim.lr=0.05", "optim.lr=0.2"]
    for lr, (seeds, epochs, best, last_valid, last_test) in rows.items():
        records = [read_jsonl(runs / f"lr-{lr.split('=')[1]}_seed-{s}" / "metrics.jsonl") for s in (0, 1)]
        assert seeds == "0,1" and epochs == "2" and last_test == "–"
        for cell, values in (
            (best, [max(r["valid_top1"] for r in rec) for rec in records]),
            (last_valid, [rec[-1]["valid_top1"] for rec in records]),
        ):
            assert cell == f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}%"
    assert "![valid top-1 per epoch, mean and std over seeds](seeds.png)" in md
    assert_png(out / "seeds.png")
    assert md.split("## Over seeds")[1].split("\n\n")[1] in done.stdout  # the table is printed

    # The same runs given as directories: the same table.
    by_dirs = tmp_path / "by-dirs"
    done = run_python(
        "-m", "bfly.report", *[str(runs / n) for n in NAMES], "--out", str(by_dirs), "--confusion", "none", timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert report_rows((by_dirs / "summary.md").read_text()) == rows


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_job_array_on_slurm_puts_its_ids_in_each_run(tmp_path):
    """Two seeds as one job array on the local SLURM test cluster."""
    from test_wandb import wandb_runs

    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1})
    wandb_dirs = {name: tmp_path / name.lower() for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")}
    for path in wandb_dirs.values():
        path.mkdir()
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", **{k: str(v) for k, v in wandb_dirs.items()})
    overrides = [o for o in tiny_overrides(data, tmp_path / "unused") if not o.startswith("run.dir=")]
    cmd = [PYTHON, "-m", "launch.submit", *CPU, "--cpus-per-task", "1", "--time", "10", "--array", "--wait"]
    cmd += ["--group", "seeds", "--seeds", "0,1", *overrides, "train.epochs=1", "train.batch_size=10"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    jobs = re.findall(r"^submitted job (\d+)_(\d+): (\S+)$", out.stdout, re.M)
    if jobs and out.returncode != 0:
        subprocess.run(["scancel", jobs[0][0]], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [(task, name) for _, task, name in jobs] == [("0", "seed-0"), ("1", "seed-1")]
    array = jobs[0][0]
    for _, task, name in jobs:
        (job,) = wandb_runs(tmp_path / "runs" / "seeds" / name)
        assert job.config["job"]["slurm_array_job_id"] == array
        assert job.config["job"]["slurm_array_task_id"] == task
        assert job.config["job"]["slurm_job_id"].isdigit()


def seed_run(path: Path, lr: float, seed: int, valid: list[float], group: str = "g") -> None:
    """A run directory as the trainer leaves it, with known valid accuracies per epoch."""
    path.mkdir(parents=True)
    config = {
        "model": {"name": "resnet50"},
        "optim": {"lr": lr},
        "train": {"seed": seed},
        "wandb": {"group": group},
        "run": {"dir": str(path)},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "train.log").write_text("")
    records = [{"epoch": e, "train_top1": v, "valid_top1": v, "train_loss": 1 - v} for e, v in enumerate(valid)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_settings_come_from_the_training_keys_that_differ(tmp_path, capsys):
    """Runs without wandb.varies (trained one by one): a setting is the training keys that differ."""
    from bfly.tools.report import main as report

    runs = tmp_path / "runs"
    seed_run(runs / "a0", 0.1, 0, [0.2, 0.5])
    seed_run(runs / "a1", 0.1, 1, [0.7, 0.4])
    seed_run(runs / "a2", 0.1, 2, [0.1, 0.3])
    seed_run(runs / "b0", 0.2, 0, [0.6, 0.7])
    seed_run(runs / "other", 0.2, 1, [0.9, 0.9], group="h")  # another group
    (runs / "b1").mkdir()
    (runs / "b1" / "config.yaml").write_text(yaml.safe_dump({"wandb": {"group": "g"}}))
    (runs / "b1" / "train.log").write_text("")  # started, no epoch finished
    assert report(["--group", "g", "--root", str(runs), "--out", str(tmp_path / "r"), "--confusion", "none"]) == 0
    out = capsys.readouterr()
    assert f"no epoch finished yet, left out: {runs / 'b1'}" in out.err
    assert "| optim.lr=0.1 | 0,1,2 | 2 | 50.00 ± 20.00% | 40.00 ± 10.00% | – |" in out.out
    assert "| optim.lr=0.2 | 0 | 2 | 70.00% | 70.00% | – |" in out.out  # one seed: no spread to show


def test_report_of_an_unknown_group_names_it(tmp_path, capsys):
    from bfly.tools.report import main as report

    (tmp_path / "runs").mkdir()
    assert report(["--group", "nope", "--root", str(tmp_path / "runs")]) == 2
    assert f"no run of wandb group 'nope' under {tmp_path / 'runs'}" in capsys.readouterr().err
