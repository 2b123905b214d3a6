"""Start-up cost and what a run prints: `import bfly.train` leaves timm and wandb out; a dataset in
the folder layout (no CSV) trains; the progress line tells loss, train accuracy, img/s, lr, the
share of time spent waiting for data and, on CUDA, the peak GPU memory, as plain lines in a log."""

import re

import pytest
import torch

from bfly.run.runlog import RunLog

from conftest import folder_copy, run_python, tiny_overrides

PROGRESS = re.compile(
    r"epoch (\d+)/(\d+) step (\d+)/(\d+) eta \d+:\d\d:\d\d loss [\d.]+ acc (\d+\.\d)% "
    r"img/s [\d.]+ lr [\d.e-]+ data (\d+)%( mem \d+\.\dG)?"
)


def test_import_bfly_train_imports_neither_timm_nor_wandb():
    # timm costs about a second per process (and imports wandb); every rank of every restart paid it.
    code = "import sys, bfly.train; print(sorted(m for m in ('timm', 'wandb') if m in sys.modules))"
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One epoch on a folder-layout copy of the mini data (6 train / 2 valid images per class, no CSV),
    through the real CLI with stdout a pipe, as under SLURM."""
    base = tmp_path_factory.mktemp("folders")
    data = folder_copy(base / "data", {"train": 6, "valid": 2, "test": 2})
    run_dir = base / "run"
    out = run_python("-m", "bfly.train", *tiny_overrides(data, run_dir, **{"train.epochs": 1}), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return data, run_dir, out.stdout


def test_a_folder_dataset_without_csv_trains_and_its_checkpoint_names_the_folders(folder_run):
    data, run_dir, stdout = folder_run
    assert "10 classes, 60 train images (folders layout)" in stdout
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["class_names"] == sorted(p.name for p in (data / "train").iterdir())
    assert state["global_step"] == 5


def test_progress_lines_are_plain_and_tell_accuracy_and_data_wait(folder_run):
    _, _, stdout = folder_run
    assert "\r" not in stdout and "\033" not in stdout
    lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch 1/1 step ")]
    assert len(lines) == 5
    for step, line in enumerate(lines, start=1):
        m = PROGRESS.fullmatch(line)
        assert m, line
        assert int(m[3]) == step and 0 <= float(m[5]) <= 100 and 0 <= int(m[6]) <= 100
        assert m[7] is None  # no GPU memory on CPU


def test_progress_line_format(tmp_path, capsys):
    log = RunLog(tmp_path, is_main=True)
    log.tty = False
    log.progress(
        0, 3, 7, 50, 3725.0, {"loss": 2.345678, "acc": "12.5%", "img/s": 1234.5, "data": "12%", "mem": "12.3G"}
    )
    log.close()
    assert (
        capsys.readouterr().out
        == "epoch 1/3 step 7/50 eta 1:02:05 loss 2.346 acc 12.5% img/s 1234 data 12% mem 12.3G\n"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_progress_line_shows_peak_gpu_memory_on_cuda(tiny_data, tmp_path):
    out = run_python(
        "-m", "bfly.train", *tiny_overrides(tiny_data, tmp_path / "run", **{"train.epochs": 1}), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("epoch 1/1 step ")]
    assert lines and all((m := PROGRESS.fullmatch(ln)) and m[7] for ln in lines), lines
