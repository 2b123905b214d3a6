"""The training core, end to end on real images: single process and 2-process DDP (gloo, CPU)."""

import json

import pytest
import torch

from bfly.job.train import main

from conftest import REPO, assert_same_weights, read_jsonl, tiny_overrides, torchrun


@pytest.fixture(scope="module")
def single_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert main(tiny_overrides(tiny_data, run_dir)) == 0
    return run_dir


def test_a_run_directory_holds_config_metrics_log_and_checkpoints(single_run):
    for name in ("config.yaml", "metrics.jsonl", "train.log", "last.pt", "best.pt"):
        assert (single_run / name).is_file(), name
    records = read_jsonl(single_run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("train_loss", "train_top1", "valid_loss", "valid_top1", "valid_top5", "lr", "img_per_s", "epoch_s"):
        assert key in records[0], key
    assert records[-1]["step"] == 2 * (60 // 12)


def test_last_pt_holds_what_the_checkpoint_format_says(single_run):
    """bfly.checkpoint writes the format in one place: a real last.pt has exactly the keys last_payload gives."""
    from bfly.core import checkpoint as ckpt

    state = torch.load(single_run / "last.pt", weights_only=True)
    ident = ckpt.identity(state["config"], state["class_names"], state["train_images"], 0, 0, None)
    layout = ckpt.last_payload(
        ident,
        model={},
        optimizer={},
        total_steps=0,
        scaler=None,
        ema=None,
        step_in_epoch=0,
        best_top1=0.0,
        epoch_sums={},
        rng=[],
        world_size=1,
    )
    assert set(state) == set(layout)
    best = torch.load(single_run / "best.pt", weights_only=True)
    assert set(best) == set(ckpt.best_payload(ident, {}, {}))


def test_a_bug_keeps_its_traceback_a_user_error_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    """Only ConfigError / DataError / CheckpointError (and a busy run directory) are user errors (exit 2)."""
    from bfly.core import stack

    assert main(tiny_overrides(tiny_data, tmp_path / "a", **{"train.batch_size": 120})) == 2  # 60 train images
    err = capsys.readouterr().err
    assert (
        err.startswith("bfly.train: error: train.batch_size=120 is larger than the train split")
        and "Traceback" not in err
    )

    def broken(*args, **kwargs):
        raise ValueError("a bug in bfly")

    monkeypatch.setattr(stack, "build_trainer", broken)
    with pytest.raises(ValueError, match="a bug in bfly"):
        main(tiny_overrides(tiny_data, tmp_path / "b"))


def test_checkpoint_contents_load_with_weights_only(single_run):
    state = torch.load(single_run / "last.pt", weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "ema",
        "epoch",
        "step_in_epoch",
        "global_step",
        "rng",
        "config",
        "class_names",
        "wandb_run_id",
        "arch",
        "num_classes",
    ):
        assert key in state, key
    assert state["epoch"] == 2 and state["global_step"] == 10 and state["step_in_epoch"] == 0
    assert state["class_names"][0] == "ADONIS" and len(state["class_names"]) == 10
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    best = torch.load(single_run / "best.pt", weights_only=True)
    assert best["metrics"]["valid_top1"] == max(r["valid_top1"] for r in read_jsonl(single_run / "metrics.jsonl"))


def test_a_finished_run_is_not_trained_again(single_run, tiny_data, capsys):
    before = (single_run / "last.pt").stat().st_mtime_ns
    assert main(tiny_overrides(tiny_data, single_run)) == 0
    assert "already finished 2 epochs" in capsys.readouterr().out
    assert (single_run / "last.pt").stat().st_mtime_ns == before


def test_mid_epoch_resume_is_bit_identical_single_process(tiny_data, tmp_path, single_run):
    run = tmp_path / "resumed"
    assert main(tiny_overrides(tiny_data, run, **{"run.stop_after_steps": 3})) == 0
    assert torch.load(run / "last.pt", weights_only=True)["step_in_epoch"] == 3
    assert main(tiny_overrides(tiny_data, run)) == 0
    assert_same_weights(run / "last.pt", single_run / "last.pt")
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]
    assert read_jsonl(run / "metrics.jsonl")[1]["train_loss"] == pytest.approx(
        read_jsonl(single_run / "metrics.jsonl")[1]["train_loss"], rel=1e-12
    )


DDP_ARGS = {"train.epochs": 6, "optim.name": "adamw", "optim.lr": 0.001}


@pytest.fixture(scope="module")
def ddp_straight(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "straight"
    out = torchrun(2, "bfly.train", tiny_overrides(tiny_data, run, **DDP_ARGS))
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out


def test_two_process_ddp_trains_and_loss_falls(ddp_straight):
    run, out = ddp_straight
    assert "2 process(es) on cpu" in out.stdout
    assert out.stdout.count("epoch 1/6 |") == 1  # rank 0 speaks, rank 1 is quiet
    losses = [r["train_loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.slow
def test_two_process_resume_after_epochs_is_bit_identical(ddp_straight, tiny_data, tmp_path):
    straight, _ = ddp_straight
    run = tmp_path / "stopped"
    args = tiny_overrides(tiny_data, run, **DDP_ARGS)
    first = torchrun(2, "bfly.train", args + ["run.stop_after_epochs=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped by run.stop_after_epochs: checkpoint at the end of epoch 3 written to" in first.stdout
    second = torchrun(2, "bfly.train", args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert_same_weights(run / "last.pt", straight / "last.pt")
    assert (
        read_jsonl(run / "metrics.jsonl")[-1]["valid_top1"] == read_jsonl(straight / "metrics.jsonl")[-1]["valid_top1"]
    )


def eval_at(world_size, ckpt, split="valid"):
    out = torchrun(world_size, str(REPO / "tests/probes/eval_probe.py"), [str(ckpt), split])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_evaluation_is_exact_at_world_sizes_1_2_3(single_run):
    results = [eval_at(w, single_run / "last.pt") for w in (1, 2, 3)]
    for r in results:
        assert r["count"] == 20  # 20 valid images: none missed, none counted twice (3 does not divide 20)
    for r in results[1:]:
        for key in ("top1", "top5", "per_class", "confusion"):
            assert r[key] == results[0][key], key
        # Counts are exact; the loss is a float sum of float32 logits whose last bits depend on batch shapes.
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
