"""python -m bfly.export: weights and a program a teammate loads without bfly, giving the checkpoint's logits."""

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision import transforms

from bfly.core.checkpoint import load
from bfly.core.data.metadata import load_metadata
from bfly.core.models import build_model
from bfly.core.trained import load_trained

from conftest import TEST_MODEL, run_python


def load_without_bfly(model_dir):
    """What the README tells a user to do: torchvision, safetensors and torch.export only."""
    info = json.loads((model_dir / "model.json").read_text())
    model = getattr(torchvision.models, info["arch"])(weights=None, num_classes=info["num_classes"])
    model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
    t = info["eval_transform"]
    preprocess = transforms.Compose(
        [
            transforms.Resize(tuple(t["size"]), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(t["mean"], t["std"]),
        ]
    )
    program = torch.export.load(model_dir / "model.pt2").module()
    return info, model.eval(), program, preprocess


@pytest.fixture(scope="module")
def resnet50_best(trained_run, tmp_path_factory) -> Path:
    """The trained run's best.pt holding a ResNet-50 instead (seeded weights): torchvision has a twin of it."""
    saved = load(trained_run / "best.pt")
    torch.manual_seed(0)
    saved["config"]["model"]["name"] = saved["arch"] = "resnet50"
    saved["model"] = build_model("resnet50", saved["num_classes"]).state_dict()
    saved.pop("ema", None)
    path = tmp_path_factory.mktemp("resnet50") / "best.pt"
    torch.save(saved, path)
    return path


def test_export_round_trip_gives_the_checkpoints_logits(resnet50_best, tmp_path):
    out = tmp_path / "model"
    best = resnet50_best
    done = run_python("-m", "bfly.export", "--checkpoint", str(best), "--out", str(out), "--split", "test", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    assert "model.safetensors in torchvision.models.resnet50 (strict load): max |diff| " in done.stdout
    assert "model.pt2 (torch.export): max |diff| " in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt2", "model.safetensors"]

    info, model, program, preprocess = load_without_bfly(out)
    saved, cfg, ours = load_trained(best)
    assert info["class_names"] == saved["class_names"] and info["num_classes"] == 10
    assert info["eval_transform"]["size"] == [cfg.data.image_size] * 2
    # Real photos of another split than the one the command checked, preprocessed from model.json alone.
    meta = load_metadata(cfg.data.root, splits=["valid"])
    photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in meta.splits["valid"].paths]
    images = torch.stack([preprocess(im) for im in photos])
    with torch.no_grad():
        reference = ours(images)
        tol = info["check"]["tolerance"]
        bound = 1e-4 * max(1.0, reference.abs().max().item())
        for name, form in (("torchvision", model), ("torch.export", program)):
            diff = (form(images) - reference).abs().max().item()
            print(f"{name}: max |diff| {diff:.2e} on {len(photos)} valid images (bound {bound:.2e})")
            assert diff <= bound, name
    assert all(d is not None and d <= tol for d in info["check"]["max_abs_diff"].values())


@pytest.mark.slow
def test_a_model_without_a_torchvision_twin_exports_and_checks_its_program(trained_run, tmp_path):
    out = tmp_path / "model"
    best = trained_run / "best.pt"
    done = run_python("-m", "bfly.export", "--checkpoint", str(best), "--out", str(out), "--split", "test", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"exported {TEST_MODEL} (10 classes) from {best} to {out}: " in done.stdout
    assert f"model.safetensors: not checked in torchvision (torchvision has no {TEST_MODEL})" in done.stdout
    assert re.search(r"^  model\.pt2 \(torch\.export\): max \|diff\| \S+ ok$", done.stdout, re.M), done.stdout
    info = json.loads((out / "model.json").read_text())
    assert info["arch"] == TEST_MODEL and info["torchvision_builder"] is None
    assert list(info["check"]["max_abs_diff"]) == ["model.pt2 (torch.export)"]
    _, _, ours = load_trained(best)
    model = build_model(TEST_MODEL, 10)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)  # bfly's own model takes them
    images = torch.randn(3, 3, 32, 32)
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), ours(images), rtol=0, atol=0)
        torch.testing.assert_close(program(images), ours(images), rtol=1e-4, atol=1e-4)


def test_export_of_a_file_that_is_not_a_checkpoint_is_one_error_line(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_text("not a checkpoint\n")
    done = run_python("-m", "bfly.export", "--checkpoint", str(bad), "--out", str(tmp_path / "m"), timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"bfly.export: error: {bad}: truncated or corrupt checkpoint")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
