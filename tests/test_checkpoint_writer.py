"""The background checkpoint writer: what training hands over is what lands on disk, at most one write
is in flight, a failed write is reported (naming the intact checkpoint) and leaves no temp file."""

import errno
import time

import pytest
import torch

from bfly.core import checkpoint as ckpt
from bfly.core.config import ConfigError, load_config


def state(value: float) -> dict:
    return {"model": {"w": torch.full((256, 256), value)}, "global_step": int(value)}


def test_the_file_holds_the_state_at_submit_time_not_what_training_did_next(tmp_path):
    live = state(1.0)
    writer = ckpt.CheckpointWriter(asynchronous=True)
    writer.submit([ckpt.Write(ckpt.to_host(live), tmp_path / ckpt.LAST, keep_previous=True, step=1)])
    live["model"]["w"].add_(41.0)  # the next optimizer step, while the file is being written
    writer.wait()
    saved = ckpt.load(tmp_path / ckpt.LAST)
    assert torch.equal(saved["model"]["w"], torch.full((256, 256), 1.0)) and saved["global_step"] == 1


def test_asynchronous_and_synchronous_writes_give_the_same_checkpoint(tmp_path):
    for mode in (True, False):
        writer = ckpt.CheckpointWriter(asynchronous=mode)
        writer.submit([ckpt.Write(ckpt.to_host(state(3.0)), tmp_path / f"{mode}.pt", step=3)])
        writer.wait()
    a, b = ckpt.load(tmp_path / "True.pt"), ckpt.load(tmp_path / "False.pt")
    assert torch.equal(a["model"]["w"], b["model"]["w"]) and a["global_step"] == b["global_step"]


def test_at_most_one_write_is_in_flight(tmp_path, monkeypatch):
    running, most = [], []
    real = ckpt.save_atomic

    def slow_save(payload, path, *args):
        running.append(path)
        most.append(len(running))
        time.sleep(0.2)
        real(payload, path, *args)
        running.remove(path)

    monkeypatch.setattr(ckpt, "save_atomic", slow_save)
    writer = ckpt.CheckpointWriter(asynchronous=True)
    t0 = time.monotonic()
    writer.submit(
        [
            ckpt.Write(ckpt.to_host(state(1.0)), tmp_path / ckpt.BEST, step=1),
            ckpt.Write(ckpt.to_host(state(1.0)), tmp_path / ckpt.LAST, keep_previous=True, step=1),
        ]
    )
    handed_over = time.monotonic() - t0
    writer.submit([ckpt.Write(ckpt.to_host(state(2.0)), tmp_path / ckpt.LAST, keep_previous=True, step=2)])
    waited = time.monotonic() - t0
    writer.wait()
    assert handed_over < 0.15 and waited >= 0.4  # the second submit waited for both files of the first
    assert max(most) == 1
    assert ckpt.load(tmp_path / ckpt.LAST)["global_step"] == 2
    assert ckpt.load(tmp_path / ckpt.PREV)["global_step"] == 1


def test_a_full_disk_in_the_background_is_reported_at_the_next_checkpoint(tmp_path, monkeypatch):
    writer = ckpt.CheckpointWriter(asynchronous=True)
    writer.submit([ckpt.Write(ckpt.to_host(state(1.0)), tmp_path / ckpt.LAST, keep_previous=True, step=1)])
    writer.wait()

    def disk_full_after_a_while(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_after_a_while)
    writer.submit([ckpt.Write(ckpt.to_host(state(2.0)), tmp_path / ckpt.LAST, keep_previous=True, step=2)])
    with pytest.raises(ckpt.CheckpointError) as e:
        writer.submit([ckpt.Write(ckpt.to_host(state(3.0)), tmp_path / ckpt.LAST, keep_previous=True, step=3)])
    assert str(e.value) == f"no space left on device while writing last.pt in {tmp_path}; last.pt (step 1) is intact"
    assert not (tmp_path / f".{ckpt.LAST}.tmp").exists()
    assert ckpt.load(tmp_path / ckpt.LAST)["global_step"] == 1


def test_space_needed_counts_the_files_already_there(tmp_path):
    last, best = 190 * 2**20, 95 * 2**20
    fresh = ckpt.space_needed(tmp_path, last, best)
    assert 3 * last + best <= fresh <= 3 * last + best + 24 * 2**20  # last, prev, temp file and best
    for name, size in ((ckpt.LAST, last), (ckpt.PREV, last), (ckpt.BEST, best)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    resumed = ckpt.space_needed(tmp_path, last, best)
    assert last <= resumed <= last + 24 * 2**20  # only the next temp file is new


def test_checkpoint_every_epochs_must_be_positive():
    assert load_config(None, ["train.checkpoint_every_epochs=3"]).train.checkpoint_every_epochs == 3
    with pytest.raises(ConfigError, match=r"^train\.checkpoint_every_epochs: must be >= 1, got 0$"):
        load_config(None, ["train.checkpoint_every_epochs=0"])


def test_checkpoint_every_epochs_thins_the_epoch_checkpoints_and_the_stall_is_recorded(tiny_data, tmp_path):
    from bfly.job.train import main

    from conftest import read_jsonl, tiny_overrides

    run = tmp_path / "run"
    assert main(tiny_overrides(tiny_data, run, **{"train.epochs": 3, "train.checkpoint_every_epochs": 2})) == 0
    # 5 steps per epoch: last.pt after epoch 2 (step 10) and at the end (step 15), none after epoch 1.
    assert torch.load(run / ckpt.LAST, weights_only=True)["global_step"] == 15
    assert torch.load(run / ckpt.PREV, weights_only=True)["global_step"] == 10
    stalls = [r["ckpt_stall_s"] for r in read_jsonl(run / "metrics.jsonl")]
    assert len(stalls) == 3 and all(s >= 0 for s in stalls) and stalls[1] > 0


def mixed_state() -> dict:
    """What a checkpoint holds: channels-last conv weights, 0-d counters, bf16, bool, int, an empty tensor,
    and one tensor in two places (best.pt's weights are last.pt's)."""
    conv = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    return {
        "model": {"conv": conv, "steps": torch.tensor(7), "half": torch.randn(5).bfloat16()},
        "flags": [torch.tensor([True, False, True]), torch.arange(3, dtype=torch.int64)],
        "empty": torch.empty(0, 4),
        "sums": (torch.tensor(2.5, dtype=torch.float64), "text", 3),
        "best": {"conv": conv},
    }


def test_staging_copies_every_tensor_exactly_in_one_reused_host_buffer(tmp_path):
    live, staging = mixed_state(), ckpt.HostStaging()
    host = staging.to_host(live)
    flat = [(a, b) for a, b in zip(ckpt._tensors(live, {}).values(), ckpt._tensors(host, {}).values())]
    assert len(flat) == 7  # the shared weight once
    for a, b in flat:
        assert torch.equal(a, b) and a.dtype == b.dtype and a.stride() == b.stride() and b is not a
    assert host["best"]["conv"] is host["model"]["conv"]  # copied once, used twice
    assert host["sums"][1:] == ("text", 3) and isinstance(host["sums"], tuple)
    buffer = staging.buffer
    live["model"]["conv"].add_(1.0)  # training goes on: the host copy does not move
    assert not torch.equal(host["model"]["conv"], live["model"]["conv"])
    staging.to_host(mixed_state())
    assert staging.buffer is buffer  # the next save reuses the buffer


def test_a_staged_checkpoint_file_holds_each_tensor_s_own_bytes_only(tmp_path):
    """A view's whole storage would otherwise be written: best.pt would carry last.pt's optimizer state."""
    live = {"model": {"w": torch.randn(64, 64)}, "optimizer": {"m": torch.randn(256, 256)}}
    staged = ckpt.HostStaging().to_host(live)
    ckpt.save_atomic({"model": staged["model"]}, tmp_path / "staged.pt")
    ckpt.save_atomic({"model": ckpt.to_host(live["model"])}, tmp_path / "alone.pt")
    assert (tmp_path / "staged.pt").stat().st_size == (tmp_path / "alone.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "staged.pt", weights_only=True)["model"]["w"], live["model"]["w"])
