"""Resuming on another world size: a 2-process run continued on 1 process, then on 2 again.

train.micro_batch_size=6 fixes the per-process batch, so the global batch of 12 is 2 processes x 1
micro-step or 1 process x 2 accumulated micro-steps: the same 12 images per optimizer step, in the
same micro-batches. The step count and the learning-rate schedule must continue exactly, mid-epoch
included, and the parameters end bit-identical to those of the uninterrupted 2-process run.
"""

import sys

import pytest
import torch

from bfly.core import checkpoint as ckpt
from bfly.core.optim import lr_at

from conftest import read_jsonl
from probes.fault_launch import STEPS, fault_args, progress_step, reference_run, run_to_end, torchrun_cmd, train_cmd

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")

LR, WARMUP = 0.05, 5  # tiny_overrides: optim.lr 0.05, one warmup epoch of 5 steps
PER_RANK_BN = {"model.sync_bn": "false"}


def expected_lr(step: int) -> float:
    """The learning rate of optimizer step `step` (0-based) in the uninterrupted schedule."""
    return lr_at(step, STEPS, WARMUP, LR, 0.0)


def progress(output: str) -> list[tuple[int, str]]:
    """(global step, printed lr) of each progress line."""
    found = []
    for line in output.splitlines():
        step = progress_step(line)
        if step is not None:
            found.append((step, line.rsplit(" lr ", 1)[1].split()[0]))
    return found


def saved(run) -> dict:
    return torch.load(run / ckpt.LAST, weights_only=True)


@pytest.mark.slow
def test_resume_2_to_1_to_2_processes_continues_step_count_and_schedule(tiny_data, tmp_path, tmp_path_factory):
    # Per-rank BatchNorm (model.sync_bn=false): each micro-batch of 6 is normalized on its own on 1 or 2
    # processes alike (SyncBN would normalize 2 processes' 12 images together).
    ref = reference_run(tmp_path_factory.getbasetemp(), 2, fault_args(tiny_data, tmp_path / "ref", **PER_RANK_BN))
    run = tmp_path / "run"
    args = fault_args(tiny_data, run, **{"train.micro_batch_size": 6, **PER_RANK_BN})

    first = run_to_end(torchrun_cmd(2, [*args, "run.stop_after_steps=3"]))
    assert "global batch 12 = 2 x 1 x 6" in first.output
    s = saved(run)
    assert (s["world_size"], s["epoch"], s["step_in_epoch"], s["global_step"]) == (2, 0, 3, 3)

    second = run_to_end(train_cmd([*args, "run.stop_after_steps=4"]))
    out = second.output
    assert "resuming a 2-process run on 1: global batch 12 kept with 2 micro-step(s) per step" in out
    assert "global batch 12 = 1 x 2 x 6" in out
    assert f"resumed from {run / ckpt.LAST}: epoch 1, step 3 of the epoch, global step 3" in out
    s = saved(run)
    assert (s["world_size"], s["epoch"], s["step_in_epoch"], s["global_step"]) == (1, 1, 2, 7)

    third = run_to_end(torchrun_cmd(2, args))
    assert "resuming a 1-process run on 2: global batch 12 kept with 1 micro-step(s) per step" in third.output
    assert f"resumed from {run / ckpt.LAST}: epoch 2, step 2 of the epoch, global step 7" in third.output

    # Every optimizer step once, in order, across the three jobs, each with the schedule's rate.
    steps = progress(first.output) + progress(second.output) + progress(third.output)
    assert [step for step, _ in steps] == list(range(1, STEPS + 1))
    assert [lr for _, lr in steps] == [f"{expected_lr(step - 1):.4g}" for step in range(1, STEPS + 1)]
    s = saved(run)
    assert s["global_step"] == STEPS and s["epoch"] == 2
    assert s["optimizer"]["param_groups"][0]["lr"] == expected_lr(STEPS - 1)
    assert s["scheduler"] == {"global_step": STEPS, "total_steps": STEPS}

    got, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [(r["epoch"], r["step"], r["lr"]) for r in got] == [(r["epoch"], r["step"], r["lr"]) for r in want]
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-9)  # same losses, summed in another order

    # The weights are those of the uninterrupted 2-process run, bit for bit: each step's gradient
    # is g0/2 + g1/2 of the same two micro-batches either way (halving is exact, a sum of two
    # floats does not depend on the order). BatchNorm's running statistics are not: one process
    # updates them with both micro-batches, two processes keep rank 0's (model.sync_bn=false).
    model = saved(run)["model"]
    straight = saved(ref)["model"]
    params = [k for k in model if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and all(torch.equal(model[k], straight[k]) for k in params)
