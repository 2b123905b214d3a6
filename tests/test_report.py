"""Spec of `python -m bfly.report`: figures and a summary table from run directories, without wandb."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bfly.core.checkpoint import load
from bfly.tools import report

from conftest import REPO

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, model: str, epochs: int, rate: float, test: bool = True) -> list[dict]:
    """A run directory as the trainer leaves it (config.yaml, metrics.jsonl), with known numbers."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model:\n  name: {model}\n")
    records = []
    for e in range(epochs):
        train = 1 - math.exp(-rate * (e + 1))
        valid = train * (0.9 + 0.04 * math.sin(3 * e))  # not monotonic: the best is not the last
        r = {
            "epoch": e,
            "step": 49 * (e + 1),
            "train_loss": 4.6 * (1 - train),
            "train_top1": train,
            "train_top5": min(1.0, train + 0.1),
            "lr": 0.1,
            "epoch_s": 60.0,
            "img_per_s": 210.0,
            "valid_loss": 4.6 * (1 - valid) + 0.2,
            "valid_top1": valid,
            "valid_top5": min(1.0, valid + 0.05),
        }
        if test:
            r.update(test_loss=r["valid_loss"] + 0.1, test_top1=valid - 0.01, test_top5=valid)
        records.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def assert_png(path: Path, min_side: int = 400) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something is drawn


def table_rows(md: str) -> dict[str, list[str]]:
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)}


def percent(cell: str) -> float:
    return float(re.match(r"([0-9.]+)%", cell).group(1))


def test_vgg19_versus_resnet50_curves_and_best_accuracy_table(tmp_path, capsys):
    vgg = fake_run(tmp_path / "runs/vgg19", "vgg19", 30, 0.12)
    resnet = fake_run(tmp_path / "runs/resnet50", "resnet50", 25, 0.2, test=False)
    out = tmp_path / "report"
    assert (
        report.main(
            [str(tmp_path / "runs/vgg19"), str(tmp_path / "runs/resnet50"), "--out", str(out), "--confusion", "none"]
        )
        == 0
    )

    for name in ("accuracy.png", "loss.png"):
        assert_png(out / name)
    md = (out / "summary.md").read_text()
    assert "](accuracy.png)" in md and "](loss.png)" in md
    rows = table_rows(md)
    assert list(rows) == ["vgg19", "resnet50"]
    for label, records in (("vgg19", vgg), ("resnet50", resnet)):
        model, epochs, train, valid, test = rows[label]
        assert model == label and int(epochs) == len(records)
        best_valid = max(records, key=lambda r: r["valid_top1"])
        assert percent(train) == round(100 * max(r["train_top1"] for r in records), 2)
        assert percent(valid) == round(100 * best_valid["valid_top1"], 2)
        assert valid.endswith(f"(epoch {best_valid['epoch'] + 1})")
        if label == "vgg19":
            assert percent(test) == round(100 * max(r["test_top1"] for r in records), 2)
    assert rows["resnet50"][4] == "–"  # test never evaluated
    assert md.splitlines()[2] in capsys.readouterr().out  # the table is printed too


def test_confusion_matrix_of_best_pt_is_evaluated_and_saved_when_missing(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "resnet50"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "config.yaml"):
        (run_dir / name).write_bytes((trained_run / name).read_bytes())
    (run_dir / "best.pt").symlink_to(trained_run / "best.pt")
    out = tmp_path / "report"
    assert report.main([str(run_dir), "--out", str(out), "--confusion", "valid"]) == 0

    assert_png(out / "confusion-resnet50-valid.png")
    result = json.loads((run_dir / "best-eval-valid.json").read_text())  # cached for the next report
    best = load(trained_run / "best.pt")["metrics"]
    confusion = result["confusion"]
    assert sum(map(sum, confusion)) == result["count"] == 30
    assert sum(confusion[i][i] for i in range(10)) / 30 == best["valid_top1"]
    assert "](confusion-resnet50-valid.png)" in (out / "summary.md").read_text()


def test_a_saved_evaluation_is_used_without_a_checkpoint(tmp_path):
    """A 100-species confusion matrix from `bfly.evaluate`'s JSON: the full dataset's shape."""
    run_dir = tmp_path / "vgg19"
    fake_run(run_dir, "vgg19", 3, 0.3)
    n = 100
    confusion = [[5 if i == j else 0 for j in range(n)] for i in range(n)]
    confusion[3][3], confusion[3][7] = 2, 3
    names = [f"SPECIES {i:03d}" for i in range(n)]
    (run_dir / "best-eval-test.json").write_text(
        json.dumps({"split": "test", "count": 500, "top1": 497 / 500, "confusion": confusion, "class_names": names})
    )
    out = tmp_path / "report"
    assert report.main([str(run_dir), "--out", str(out), "--confusion", "test"]) == 0
    assert_png(out / "confusion-vgg19-test.png", min_side=2000)


def test_a_run_without_checkpoint_or_saved_evaluation_still_gets_its_curves(tmp_path, capsys):
    fake_run(tmp_path / "vgg19", "vgg19", 3, 0.3)
    assert report.main([str(tmp_path / "vgg19"), "--out", str(tmp_path / "report")]) == 0
    assert "no best.pt and no best-eval-valid.json: no confusion matrix" in capsys.readouterr().err
    assert_png(tmp_path / "report/accuracy.png")
    assert not list((tmp_path / "report").glob("confusion-*"))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no metrics.jsonl (not a bfly run directory, or no epoch finished yet)"),
        ("", "empty (no epoch finished yet)"),
        ('{"epoch": 0, "train_top1": 0.5\n', "not valid JSON lines"),
    ],
)
def test_a_folder_that_is_not_a_run_is_a_clear_error(content, message, tmp_path, capsys):
    run_dir = tmp_path / "not-a-run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "metrics.jsonl").write_text(content)
    assert report.main([str(run_dir), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bfly.report: error: {run_dir}") and message in err and "Traceback" not in err


def test_report_command_line(tmp_path):
    fake_run(tmp_path / "vgg19", "vgg19", 4, 0.3)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bfly.report",
            str(tmp_path / "vgg19"),
            "--out",
            str(tmp_path / "report"),
            "--confusion",
            "none",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "TkAgg"},
    )  # the Agg backend is forced anyway
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "report/accuracy.png")
