"""Spec of the preflight, `python -m bfly.train --check`: the plan printed, every problem listed
one per line with exit status 2, and nothing written (a run directory is neither created nor
changed). Also its use from launch.submit --check and the sbatch scripts (BFLY_CHECK=1 / --check)."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from bfly.job.train import main

from conftest import PYTHON, REPO, TEST_MODEL, run_python, subprocess_env, tiny_overrides


def check(*args: str) -> subprocess.CompletedProcess:
    """The real CLI, output to pipes as in a SLURM log."""
    return run_python("-m", "bfly.train", "--check", *args, timeout=120)


def plan_line(out: str, what: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(what + " ")]
    assert len(lines) == 1, (what, out)
    return lines[0][len(what) :].strip()


def problems(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("bfly.train --check: problem: ")]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder`: mtime and content hash (files) — what "touching nothing" means."""
    out = {}
    for path in sorted(folder.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (path.stat().st_mtime_ns, digest)
    return out


def test_check_prints_the_plan_and_creates_no_run_directory(tiny_data, tmp_path):
    run_dir = tmp_path / "runs" / "new"
    out = check("--nproc", "2", *tiny_overrides(tiny_data, run_dir, **{"train.micro_batch_size": 3}))
    assert out.returncode == 0, out.stderr
    assert plan_line(out.stdout, "data") == f"{tiny_data} (course layout), 10 classes; images: train 60, valid 20"
    assert plan_line(out.stdout, "images").startswith("80 of train, valid opened and decoded in ")
    assert plan_line(out.stdout, "images").endswith(": 0 unreadable")
    assert plan_line(out.stdout, "world size") == "2 process(es) (--nproc)"
    assert plan_line(out.stdout, "global batch") == "12 = 2 rank(s) x 2 accumulation step(s) x 3 micro-batch"
    assert plan_line(out.stdout, "schedule").startswith("5 steps/epoch x 2 epochs = 10 steps (warmup 5;")
    assert plan_line(out.stdout, "run dir").startswith(
        f"{run_dir} (does not exist yet; would be created under {tmp_path})"
    )
    assert " free, training asks for " in plan_line(out.stdout, "run dir")
    assert plan_line(out.stdout, "checkpoints").startswith("last.pt ~")
    assert plan_line(out.stdout, "resume") == f"no: a fresh run (no last.pt in {run_dir})"
    assert out.stdout.rstrip().splitlines()[-1].startswith("preflight: ok")
    # The progress line in a log file: plain lines, no carriage returns or escape codes.
    assert "80/80" in out.stderr and "\r" not in out.stderr and "\033" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_world_size_comes_from_WORLD_SIZE_without_nproc(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--check", *tiny_overrides(tiny_data, tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert plan_line(out, "world size") == "3 process(es) (WORLD_SIZE)"
    assert plan_line(out, "global batch") == "12 = 3 rank(s) x 1 accumulation step(s) x 4 micro-batch"


def broken_dataset(tiny_data: Path, root: Path) -> tuple[Path, list[Path]]:
    """tiny_data plus two train rows whose images are unreadable: a truncated JPEG, a text file."""
    shutil.copytree(tiny_data, root, symlinks=True)
    (root / "broken").mkdir()
    good = (tiny_data / "train" / "ADONIS" / "001.jpg").read_bytes()
    truncated, text = root / "broken" / "truncated.jpg", root / "broken" / "text.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    text.write_text("not a picture")
    with open(root / "train.csv", "a") as f:
        f.write("broken/truncated.jpg,ADONIS,0\nbroken/text.jpg,ADONIS,0\n")
    return root, [truncated, text]


def test_check_lists_every_problem_one_line_each_and_exits_2(tiny_data, tmp_path, capsys):
    root, bad = broken_dataset(tiny_data, tmp_path / "data")
    run_dir = tmp_path / "run"
    # Two more problems besides the two images: a batch larger than the split, mixup with an odd micro-batch.
    assert (
        main(["--check", "--nproc", "1", *tiny_overrides(root, run_dir, **{"train.batch_size": 63, "data.mixup": 0.2})])
        == 2
    )
    out = capsys.readouterr()
    found = problems(out.err)
    assert len(found) == 4, out.err
    assert any(str(bad[0]) in p and "cannot decode image" in p for p in found)
    assert any(str(bad[1]) in p and "not an image Pillow can read" in p for p in found)
    assert any("train.batch_size=63 is larger than the train split (62 images)" in p for p in found)
    assert any("need an even micro-batch; it is 63" in p for p in found)
    assert out.err.rstrip().splitlines()[-1].startswith("preflight: 4 problem(s)")
    assert plan_line(out.out, "images").endswith(": 2 unreadable")
    assert not run_dir.exists()


def test_check_of_a_folder_without_data_names_it(tmp_path, capsys):
    assert main(["--check", *tiny_overrides(tmp_path, tmp_path / "run")]) == 2
    (line,) = problems(capsys.readouterr().err)
    assert f"{tmp_path}: no dataset metadata found" in line


def test_a_config_error_is_the_one_problem(capsys):
    assert main(["--check", "train.epochz=3"]) == 2
    (line,) = problems(capsys.readouterr().err)
    assert "unknown config key 'train.epochz'" in line


def test_check_tells_where_a_run_would_resume_and_changes_nothing(stopped_run, tiny_data, capsys):
    before = snapshot(stopped_run)
    assert main(["--check", "--nproc", "2", *tiny_overrides(tiny_data, stopped_run)]) == 0
    out = capsys.readouterr().out
    assert plan_line(out, "resume") == (
        f"yes, from {stopped_run / 'last.pt'}: epoch 1, step 3 of the epoch, "
        "global step 3; saved by 1 process(es), continued on 2"
    )
    assert plan_line(out, "run dir").startswith(f"{stopped_run} (exists)")
    assert snapshot(stopped_run) == before


def test_check_refuses_a_checkpoint_of_another_model(stopped_run, tiny_data, capsys):
    before = snapshot(stopped_run)
    assert main(["--check", *tiny_overrides(tiny_data, stopped_run, **{"model.name": "vgg19"})]) == 2
    (line,) = problems(capsys.readouterr().err)
    assert f"{stopped_run / 'last.pt'}: checkpoint is a {TEST_MODEL} model, this run builds vgg19" in line
    assert snapshot(stopped_run) == before


# --- before queueing: launch.submit --check and the sbatch scripts ---------------------------------


def test_launch_submit_check_submits_nothing_on_a_problem(tiny_data, tmp_path, capsys):
    pytest.importorskip("submitit")
    from launch.submit import main as submit

    root, _ = broken_dataset(tiny_data, tmp_path / "data")
    flags = ["--check", "--dry-run", "--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2"]
    assert submit([*flags, *tiny_overrides(root, tmp_path / "run")]) == 2
    out = capsys.readouterr()
    assert "nothing submitted" in out.err and len(problems(out.err)) == 2
    assert plan_line(out.out, "world size") == "2 process(es) (--nproc)"
    assert "# run directory" not in out.out  # the dry run's listing never came
    assert submit([*flags, *tiny_overrides(tiny_data, tmp_path / "run")]) == 0
    assert "preflight: ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    "script, how", [("train_single_node.sbatch", "BFLY_CHECK"), ("train_multi_node.sbatch", "--check")]
)
def test_sbatch_scripts_run_the_preflight_first_and_stop_on_a_problem(script, how, tiny_data, tmp_path):
    root, bad = broken_dataset(tiny_data, tmp_path / "data")
    env = subprocess_env(
        BFLY_PYTHON=PYTHON,
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="n1",
        SLURM_JOB_NUM_NODES="2",
        BFLY_NPROC_PER_NODE="2",
        **({"BFLY_CHECK": "1"} if how == "BFLY_CHECK" else {}),
    )
    for name in [
        n
        for n in env
        if n.startswith("SLURM_") and n not in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES")
    ]:
        del env[name]
    args = (["--check"] if how == "--check" else []) + tiny_overrides(root, tmp_path / "run")
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert "bfly: error: preflight found problems (listed above): not training" in out.stderr
    assert len(problems(out.stderr)) == 2 and str(bad[0]) in out.stderr
    world = "2" if script == "train_single_node.sbatch" else "4"  # 2 per node, x 2 nodes
    assert plan_line(out.stdout, "world size") == f"{world} process(es) (--nproc)"
    assert not (tmp_path / "run").exists()
