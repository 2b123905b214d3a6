"""Smoke tests of the benchmark at tiny sizes (nothing here asserts a speed); the GPU check: test_gpu_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bfly.tools import bench, throughput
from bfly.tools.throughput import Row, Settings

CPU = torch.device("cpu")
MINI = Path(__file__).resolve().parent.parent / "data" / "butterfly-mini"


def tiny(tmp_path: Path, **kw) -> Settings:
    base = {
        "batch_size": 4,
        "image_size": 32,
        "amp": "off",
        "steps": 1,
        "warmup": 1,
        "rounds": 1,
        "data": str(MINI),
        "cache_dir": str(tmp_path / "cache"),
        "workers": 0,
    }
    return Settings(**(base | kw))


def test_host_mode_cli_prints_the_per_image_costs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(
        [
            "--mode",
            "host",
            "--data",
            str(MINI),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--host-images",
            "16",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "PIL decode + course augment" in printed and "cached, split in host memory" in printed
    rows = json.loads(out.read_text())["rows"]
    pil, plan_only, gather = (r["us_per_image"] for r in rows[:3])
    assert pil > 0 and 0 < plan_only <= gather
    assert rows[2]["ratio"] == pytest.approx(pil / gather)


def test_model_mode_compares_ours_with_torchvision_and_counts_flops(tmp_path):
    rows = throughput.bench_model("resnet50", tiny(tmp_path), CPU, reference=True, inputs=("cached", "pil"))
    ours, theirs, cached, pil = rows
    assert ours.case == "resnet50 (ours), synthetic" and theirs.case == "resnet50 (torchvision), synthetic"
    assert ours.img_s > 0 and theirs.img_s > 0 and ours.ratio == pytest.approx(ours.img_s / theirs.img_s)
    # ResNet-50 forward is 4.1 GMAC at 224 px: at 32 px, x 2 FLOP/MAC, x ~3 for the backward, x 4 images.
    expected = 4.1e9 * (32 / 224) ** 2 * 2 * 3 * 4
    assert 0.7 * expected < ours.extra["step_gflops"] * 1e9 < 1.2 * expected
    assert ours.extra["step_gflops"] == pytest.approx(theirs.extra["step_gflops"])  # the same network
    assert ours.mfu is None  # no known peak on a CPU
    assert cached.case == "resnet50 (ours), real data via cached" and cached.ratio_of == "synthetic"
    assert pil.case == "resnet50 (ours), real data via pil" and 0 <= pil.wait <= 1


def test_ddp_wrapper_and_input_only_modes_run(tmp_path):
    (row,) = throughput.bench_model("resnet50", tiny(tmp_path, ddp=True), CPU, reference=False)
    assert row.img_s > 0 and "ddp" in row.settings
    pil, cached = throughput.bench_input(tiny(tmp_path), CPU)
    assert pil.img_s > 0 and cached.img_s > 0 and "cached" in cached.case


def test_a_failing_cell_becomes_a_row(tmp_path):
    rows = throughput.guarded("model", "nonet", "b4", lambda: throughput.bench_model("nonet", tiny(tmp_path), CPU))
    assert len(rows) == 1 and rows[0].note.startswith("FAILED: ValueError: unknown model 'nonet'")
    table = throughput.format_table(rows + [Row("model", "x", img_s=10.0, ratio=1.02, ratio_of="torchvision")])
    assert "FAILED" in table and "1.02x" in table


def test_the_benchmark_times_the_trainer_training_builds(tmp_path):
    """bfly.bench and bfly.train assemble through bfly.stack: same optimizer, loss, AMP policy and wrapping."""
    from bfly.core import stack
    from bfly.core.models import build_model

    s = tiny(tmp_path)
    benched = throughput.make_trainer(build_model("resnet50", throughput.NUM_CLASSES), CPU, s)
    cfg = throughput.data_config(s)
    raw = stack.place_model(stack.init_model(cfg, throughput.NUM_CLASSES), cfg, CPU)
    trained = stack.build_trainer(cfg, raw, CPU, throughput.NUM_CLASSES, accum_steps=1, steps_per_epoch=1, ddp=False)
    assert type(benched.optimizer) is type(trained.optimizer)
    assert [{k: v for k, v in g.items() if k != "params"} for g in benched.optimizer.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in trained.optimizer.param_groups
    ]
    assert type(benched.criterion) is type(trained.criterion)
    assert (benched.amp_dtype, benched.scaler, benched.ema) == (trained.amp_dtype, trained.scaler, trained.ema)
