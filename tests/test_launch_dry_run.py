"""launch.submit without a cluster: what --dry-run would submit (golden files), and bad command lines.

Golden files hold the output with this checkout's path as <REPO> and the python executable as
<PYTHON>. After an intended change, rewrite them with
    PYTHONPATH=. python tests/test_launch_dry_run.py
and review the diff.
"""

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")  # the launcher's extra (`pip install -e '.[cluster]'`); a GPU box may lack it

from launch.cluster_args import UsageError, parse, parse_time
from launch.submit import main

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

CASES = {
    "dry_run_resnet50_2x4gpu.txt": [
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--cpus-per-task",
        "10",
        "--mem-gb",
        "200",
        "--partition",
        "gpu",
        "--account",
        "proj42",
        "--qos",
        "high",
        "--constraint",
        "h100",
        "--time",
        "12:00:00",
        "--config",
        "configs/resnet50.yaml",
        "train.epochs=90",
    ],
    "dry_run_sweep_array_cpu.txt": [
        "--dry-run",
        "--array",
        "--group",
        "seed-comparison",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--time",
        "90",
        "--config",
        "configs/vgg19_bn.yaml",
        "--config",
        "configs/resnet50.yaml",
        "wandb.mode=offline",
    ],
    "dry_run_grid_2x2x3_array_cpu.txt": [
        "--dry-run",
        "--array",
        "--group",
        "lr-model",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--time",
        "90",
        "--sweep",
        "optim.lr=0.05,0.1",
        "--sweep",
        "model.name=resnet50,vgg19_bn",
        "--seeds",
        "0,1,2",
        "--config",
        "configs/resnet50.yaml",
    ],
}


def placeholders(text: str) -> str:
    """`text` with this checkout's path as <REPO> and the python executable as <PYTHON>, unquoted: the
    sbatch file quotes a path with a space in it, and the golden files hold the same for any checkout."""
    text = text.replace(sys.executable, "<PYTHON>").replace(str(REPO), "<REPO>")
    return re.sub(r"'(<(?:REPO|PYTHON)>[^' ]*)'", r"\1", text)


def dry_run_output(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return placeholders(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_prints_the_sbatch_file_and_run_directories(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert dry_run_output(CASES[name], capsys) == (GOLDEN / name).read_text()


def test_dry_run_submits_nothing_and_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["--dry-run", "--gpus-per-node", "2", "model.name=vgg19"]) == 0
    out = capsys.readouterr().out
    assert f"# run directory: {tmp_path}/runs/vgg19" in out
    assert "#SBATCH --gpus-per-node=2" in out and "#SBATCH --ntasks-per-node=2" in out
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_job_asks_for_no_gpus(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "3"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(("#SBATCH --gpu", "#SBATCH --gres"))] == []
    assert "#SBATCH --ntasks-per-node=3" in out


def test_sweep_runs_share_a_wandb_group_and_get_their_own_directories(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["--dry-run", "--config", "configs/vgg19.yaml", "--config", "configs/resnet50.yaml"]) == 0
    out = capsys.readouterr().out
    args = [line for line in out.splitlines() if line.startswith("# bfly.train arguments")]
    assert len(args) == 2 and out.count("#!/bin/bash") == 2  # two jobs, not an array
    groups = {word for line in args for word in line.split() if word.startswith("wandb.group=vgg19-resnet50-")}
    assert len(groups) == 1
    assert f"run.dir={REPO}/runs/vgg19" in args[0] and f"run.dir={REPO}/runs/resnet50" in args[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
        (["--gpus-per-node", "0"], "a CPU job needs --tasks-per-node"),
        (["--time", "1:2:3:4"], "expected minutes or [D-]HH:MM[:SS]"),
        (["--time", "5", "--signal-delay-s", "300"], "must be shorter than --time"),
        (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"),
        (["--cluster", "debug", "--gpus-per-node", "2"], "one trainer in this process"),
    ],
)
def test_bad_cluster_flags_are_refused_with_the_flag_named(argv, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(argv)


def test_bad_training_config_is_refused_before_anything_is_queued(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["--dry-run", "train.epochz=3"]) == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err
    assert main(["--dry-run", "--config", "missing.yaml"]) == 2
    assert "cannot read config file missing.yaml" in capsys.readouterr().err


def test_two_runs_into_one_directory_are_refused(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--dry-run", "--config", "configs/vgg19.yaml", "--config", "configs/resnet50.yaml", "run.dir=runs/x"]
    assert main(argv) == 2
    assert "would both train into" in capsys.readouterr().err


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("2-00", 2880), ("0-1:30", 90), ("10:30", 11)])
def test_time_limits_in_slurm_formats(text, minutes):
    assert parse_time(text) == minutes


def rewrite_golden_files() -> None:
    import contextlib
    import io
    import os

    os.chdir(REPO)
    for name, argv in CASES.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
        (GOLDEN / name).write_text(placeholders(out.getvalue()))
        print(f"wrote {GOLDEN / name}")


if __name__ == "__main__":
    rewrite_golden_files()
