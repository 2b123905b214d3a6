"""Spec of `python -m bfly.evaluate` and `python -m bfly.predict`: using a trained checkpoint.

The checkpoints come from the real trainer: one epoch of ResNet50 at 32 px on a small subset of
butterfly-mini (session fixture `trained_run`, shared with test_report.py).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfly.core import trained
from bfly.core.checkpoint import load
from bfly.core.data.transforms import build_eval_transform
from bfly.tools import evaluate, predict

from conftest import MINI_ROOT as MINI, REPO, tiny_dataset, torchrun


def run_cli(module, argv: list[str], capsys) -> tuple[int, str, str]:
    rc = module.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, program: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{program}: error: ") and "Traceback" not in err
    return lines[0]


# --- evaluate ----------------------------------------------------------------------------------------


def test_evaluate_reproduces_the_training_metrics_and_saves_json(trained_run, capsys):
    best = trained_run / "best.pt"
    metrics = load(best)["metrics"]
    rc, out, _ = run_cli(evaluate, ["--checkpoint", str(best), "--split", "valid"], capsys)
    assert rc == 0
    result = json.loads((trained_run / "best-eval-valid.json").read_text())
    assert result["count"] == 30
    assert result["top1"] == metrics["valid_top1"]
    assert result["top5"] == metrics["valid_top5"]
    assert result["loss"] == pytest.approx(metrics["valid_loss"], rel=1e-6)
    per_class = result["per_class"]
    assert [c["species"] for c in per_class] == load(best)["class_names"]
    assert sum(c["correct"] for c in per_class) == round(result["top1"] * 30)
    assert all(c["count"] == 3 and c["accuracy"] == c["correct"] / 3 for c in per_class)
    assert sum(map(sum, result["confusion"])) == 30
    assert f"top-1 {result['top1']:.2%}" in out and per_class[3]["species"] in out
    assert f"saved to {trained_run / 'best-eval-valid.json'}" in out


def test_evaluate_any_split_in_the_kaggle_layout(trained_run, tmp_path, capsys):
    kaggle = tiny_dataset(tmp_path / "kaggle", {"train": 2, "valid": 3, "test": 3}, layout="kaggle")
    out_file = tmp_path / "test-result.json"
    rc, _out, _ = run_cli(
        evaluate,
        [
            "--checkpoint",
            str(trained_run / "best.pt"),
            "--split",
            "test",
            "--data-root",
            str(kaggle),
            "--out",
            str(out_file),
        ],
        capsys,
    )
    assert rc == 0
    result = json.loads(out_file.read_text())
    assert result["layout"] == "kaggle" and result["split"] == "test" and result["count"] == 30
    test_top1 = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]["test_top1"]
    assert result["top1"] == test_top1  # one epoch: best.pt holds the weights that training tested


def test_evaluate_under_torchrun_is_exact(trained_run, tmp_path, capsys):
    """Two processes each evaluate their own shard; the summed result equals one process's."""
    ckpt_path = trained_run / "last.pt"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert (
        evaluate.main(["--checkpoint", str(ckpt_path), "--split", "valid", "--batch-size", "4", "--out", str(one)]) == 0
    )
    proc = torchrun(
        2,
        "bfly.evaluate",
        ["--checkpoint", str(ckpt_path), "--split", "valid", "--batch-size", "4", "--out", str(two)],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r2["count"] == 30
    assert r2["confusion"] == r1["confusion"]
    assert r2["top5"] == r1["top5"]
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)


def test_evaluate_refuses_a_dataset_with_another_class_count(trained_run, tmp_path, capsys):
    nine = tiny_dataset(tmp_path / "nine", {"train": 1, "valid": 1, "test": 1}, drop_class=9)
    rc, _, err = run_cli(
        evaluate, ["--checkpoint", str(trained_run / "best.pt"), "--split", "valid", "--data-root", str(nine)], capsys
    )
    assert rc == 2
    assert "checkpoint has 10 classes, this dataset has 9" in one_error_line(err, "bfly.evaluate")


def test_evaluate_refuses_a_dataset_that_names_the_classes_differently(trained_run, tmp_path, capsys):
    root = tiny_dataset(tmp_path / "renamed", {"train": 1, "valid": 1, "test": 1})
    with open(root / "valid.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    with open(root / "valid.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *[[p, "NOT ADONIS" if i == "0" else n, i] for p, n, i in rows]])
    rc, _, err = run_cli(
        evaluate, ["--checkpoint", str(trained_run / "best.pt"), "--split", "valid", "--data-root", str(root)], capsys
    )
    assert rc == 2
    assert "class id 0 is 'ADONIS' in the checkpoint but 'NOT ADONIS'" in one_error_line(err, "bfly.evaluate")


# --- checkpoints that do not fit ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_checkpoints(trained_run, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    saved = load(trained_run / "best.pt")
    paths = {}
    changes = {"vgg19": {"arch": "vgg19"}, "five_classes": {"num_classes": 5}, "alexnet": {"arch": "alexnet"}}
    for name, change in changes.items():
        paths[name] = d / f"{name}.pt"
        torch.save({**saved, **change}, paths[name])
    paths["not_bfly"] = d / "not_bfly.pt"
    torch.save({"state_dict": saved["model"]}, paths["not_bfly"])
    paths["missing"] = d / "missing.pt"
    return paths


EXPECTED = {
    "vgg19": "weights do not fit a vgg19 with 10 classes",
    "five_classes": "fc.weight is [10, 128] in the checkpoint, [5, 128] in the model",
    "alexnet": "checkpoint is a 'alexnet' model; bfly builds resnet50, vgg19, vgg19_bn, resnet_tiny",
    "not_bfly": "not a bfly checkpoint (no 'arch' entry)",
    "missing": "checkpoint not found",
}


@pytest.mark.parametrize("case", EXPECTED)
@pytest.mark.parametrize("tool", ["evaluate", "predict"])
def test_a_checkpoint_that_does_not_fit_is_one_clear_error(tool, case, bad_checkpoints, capsys):
    module = {"evaluate": evaluate, "predict": predict}[tool]
    extra = ["--split", "valid"] if tool == "evaluate" else [str(MINI / "valid/ADONIS/1.jpg")]
    rc, out, err = run_cli(module, ["--checkpoint", str(bad_checkpoints[case]), *extra], capsys)
    assert rc == 2 and out == ""
    line = one_error_line(err, f"bfly.{tool}")
    assert str(bad_checkpoints[case]) in line and EXPECTED[case] in line


# --- predict ------------------------------------------------------------------------------------------


def parse_predictions(out: str) -> dict[str, list[tuple[str, float]]]:
    blocks: dict[str, list[tuple[str, float]]] = {}
    current = None
    for line in out.splitlines():
        if not line.startswith("  "):
            current = blocks.setdefault(line, [])
            continue
        rank, rest = line.strip().split(". ", 1)
        name, pct = rest.rsplit(" ", 1)
        assert int(rank) == len(current) + 1
        current.append((name.strip(), float(pct.rstrip("%")) / 100))
    return blocks


@pytest.fixture
def odd_images(tmp_path) -> dict[str, Path]:
    """One photo in many sizes and modes, and files that are not images."""
    with Image.open(MINI / "valid/ADONIS/1.jpg") as im:
        photo = im.convert("RGB")
    made = {
        "gray.png": photo.convert("L"),
        "rgba.png": photo.convert("RGBA"),
        "palette.png": photo.convert("P"),
        "cmyk.jpg": photo.convert("CMYK"),
        "wide.png": photo.resize((613, 97)),
        "tiny.png": photo.resize((7, 5)),
        "bits16.png": Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257),
    }
    paths = {}
    for name, im in made.items():
        paths[name] = tmp_path / name
        im.save(paths[name])
    paths["text.jpg"] = tmp_path / "text.jpg"
    paths["text.jpg"].write_text("not a photo")
    paths["truncated.jpg"] = tmp_path / "truncated.jpg"
    paths["truncated.jpg"].write_bytes((MINI / "valid/ADONIS/1.jpg").read_bytes()[:600])
    return paths


def test_predict_names_the_top5_species_of_each_image(trained_run, odd_images, capsys):
    best = trained_run / "best.pt"
    good = [p for n, p in odd_images.items() if n.endswith(".png") or n == "cmyk.jpg"]
    bad = [odd_images["text.jpg"], odd_images["truncated.jpg"], odd_images["text.jpg"].with_name("absent.png")]
    args = [str(p) for p in [good[0], *bad, *good[1:]]]
    rc, out, err = run_cli(predict, ["--checkpoint", str(best), *args], capsys)

    assert rc == 1  # some files failed, all others answered
    blocks = parse_predictions(out)
    assert list(blocks) == [str(p) for p in good]
    names = load(best)["class_names"]
    for top in blocks.values():
        assert len(top) == 5 and all(name in names for name, _ in top)
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    errors = err.splitlines()
    assert len(errors) == 3 and "Traceback" not in err
    assert f"{bad[0]}: not an image Pillow can read" in errors[0]
    assert str(bad[1]) in errors[1] and "cannot decode image" in errors[1]
    assert f"{bad[2]}: image file not found" in errors[2]


def test_predict_applies_the_eval_transform(trained_run, odd_images, capsys):
    """Probabilities equal the model's softmax on the eval transform of the RGB image, whatever its mode."""
    best = trained_run / "best.pt"
    rc, out, _ = run_cli(
        predict,
        ["--checkpoint", str(best), "--top", "10", str(odd_images["gray.png"]), str(odd_images["wide.png"])],
        capsys,
    )
    assert rc == 0
    saved, cfg, model = trained.load_trained(best)
    transform = build_eval_transform(cfg.data.image_size)
    for path, top in parse_predictions(out).items():
        with Image.open(path) as im:
            x = transform(im.convert("RGB"))[None]
        with torch.no_grad():
            expected = model(x).softmax(1)[0]
        assert len(top) == 10
        for name, p in top:
            assert p == pytest.approx(expected[saved["class_names"].index(name)].item(), abs=5.1e-5)  # printed to 0.01%


def test_predict_command_line(trained_run):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bfly.predict",
            "--checkpoint",
            str(trained_run / "best.pt"),
            "--top",
            "3",
            str(MINI / "test/PAINTED LADY/1.jpg"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    top = parse_predictions(proc.stdout)[str(MINI / "test/PAINTED LADY/1.jpg")]
    assert len(top) == 3
