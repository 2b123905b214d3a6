"""Checkpoints kept by policy: train.keep_last_n rolls last.pt -> last.prev.pt -> step-<N>.pt and deletes
what falls out, train.snapshot_every_epochs keeps epoch-<E>.pt forever, best.pt as always; nothing a
resume needs is ever deleted, a kill during a write loses nothing, and a snapshot resumes a run."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from bfly.core import checkpoint as ckpt
from bfly.core.config import ConfigError, load_config
from bfly.job.train import main

from conftest import assert_same_weights
from probes.fault_launch import Launch, fault_args, run_to_end, train_cmd

POLICY = {"train.keep_last_n": 3, "train.snapshot_every_epochs": 1}  # with FAULT: last.pt every 2 steps


def checkpoint_files(run: Path) -> dict[str, int | None]:
    """Every checkpoint file of a run directory (temp files included) -> the global step it holds."""
    return {p.name: ckpt.saved_step(p) for p in sorted(run.iterdir()) if p.name.endswith((".pt", ".tmp"))}


# After each save of a 2-epoch run (5 steps per epoch, last.pt every 2 steps and at each epoch's end),
# stopped after step 4 and resumed: name -> step (best.pt: whichever epoch was best).
EXPECTED = [
    {"last.pt": 2},
    {"last.pt": 4, "last.prev.pt": 2},
    # resumed: the first save rolls the previous job's last.prev.pt by the step it holds
    {"last.pt": 5, "last.prev.pt": 4, "step-0000002.pt": 2, "epoch-001.pt": 5, "best.pt": 5},
    {"last.pt": 6, "last.prev.pt": 5, "step-0000004.pt": 4, "epoch-001.pt": 5, "best.pt": 5},
    {"last.pt": 8, "last.prev.pt": 6, "step-0000005.pt": 5, "epoch-001.pt": 5, "best.pt": 5},
    {"last.pt": 10, "last.prev.pt": 8, "step-0000006.pt": 6, "epoch-001.pt": 5, "epoch-002.pt": 10, "best.pt": None},
]


def without_best_step(files: dict[str, int | None]) -> dict[str, int | None]:
    return {k: (None if k == ckpt.BEST else v) for k, v in files.items()}


@pytest.fixture(scope="module")
def policy_run(tiny_data, tmp_path_factory) -> tuple[Path, list[dict[str, int | None]]]:
    """A run with the policy, stopped after step 4 and resumed to the end; the checkpoint files of its run
    directory seen right after each write the background writer finished (the real writer, observed)."""
    run = tmp_path_factory.mktemp("policy") / "run"
    seen: list[dict[str, int | None]] = []
    write_all = ckpt.CheckpointWriter._write_all

    def observed(self, writes):
        write_all(self, writes)
        seen.append(checkpoint_files(run))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt.CheckpointWriter, "_write_all", observed)
        args = fault_args(tiny_data, run, **POLICY)
        assert main([*args, "run.stop_after_steps=4"]) == 0
        assert main(args) == 0
    return run, seen


def test_the_checkpoint_files_after_each_save_are_what_the_policy_keeps(policy_run):
    run, seen = policy_run
    assert [without_best_step(s) for s in seen] == [without_best_step(e) for e in EXPECTED]
    assert seen[-1][ckpt.BEST] in (5, 10)
    assert os.path.samefile(run / "epoch-002.pt", run / ckpt.LAST)  # a snapshot is a hard link: no copy


@pytest.mark.slow
def test_a_kill_during_a_rolling_write_loses_nothing(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    args = fault_args(tiny_data, run, **POLICY)
    run_to_end(train_cmd([*args, "run.stop_after_steps=4"]))
    before = checkpoint_files(run)
    assert before == EXPECTED[1]
    # The next job's first write that replaces last.pt (step 5, the epoch's end) pauses half-way; SIGKILL.
    paused = tmp_path / "paused"
    launch = Launch(train_cmd(args), timeout=300, env={"BFLY_TEST_PAUSE_CHECKPOINT": str(paused)})
    while not paused.exists():
        if launch.proc.poll() is not None:
            launch.fail("exited before the paused write")
        time.sleep(0.05)
    os.kill(launch.proc.pid, signal.SIGKILL)
    assert launch.wait(30) == -signal.SIGKILL
    after = checkpoint_files(run)
    assert f".{ckpt.LAST}.tmp" in after  # the interrupted write (its tail may still have been buffered)
    del after[f".{ckpt.LAST}.tmp"]
    assert after.pop(ckpt.BEST) == 5  # written before last.pt in the same batch
    assert after == before  # nothing renamed, nothing deleted
    resumed = run_to_end(train_cmd(args))
    assert f"resumed from {run / ckpt.LAST}: epoch 1, step 4 of the epoch, global step 4" in resumed.output
    final = checkpoint_files(run)
    assert without_best_step(final) == without_best_step(EXPECTED[-1])
    assert_same_weights(run / ckpt.LAST, ref1 / ckpt.LAST)  # the uninterrupted run's (same threads)


def test_a_snapshot_resumes_a_run_under_the_same_drift_rules(policy_run, tiny_data, tmp_path, capsys):
    policy, _ = policy_run
    snapshot = policy / "epoch-001.pt"
    run = tmp_path / "run"
    args = fault_args(tiny_data, run, **POLICY)
    assert main([*args, f"run.resume={snapshot}", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert f"resuming {snapshot} with a different config: optim.lr: 0.05 -> 0.1" in err
    assert not run.exists() or not any(run.glob("*.pt"))
    # As a name in the run directory, with the same config: the run goes on exactly as the original did.
    run.mkdir(exist_ok=True)
    os.link(snapshot, run / "epoch-001.pt")
    assert main([*args, "run.resume=epoch-001.pt"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'epoch-001.pt'}: epoch 2, step 0 of the epoch, global step 5" in out
    assert_same_weights(run / ckpt.LAST, policy / ckpt.LAST)
    assert (run / "epoch-001.pt").exists()  # never deleted


def test_space_needed_counts_what_the_policy_keeps(tmp_path):
    last, best = 190 * 2**20, 95 * 2**20
    margin = 24 * 2**20
    need = ckpt.space_needed(tmp_path, last, best, keep_last_n=4, snapshots=3)
    assert (4 + 1 + 3) * last + best <= need <= (4 + 1 + 3) * last + best + margin  # 4 kept + temp + snapshots
    for name in (ckpt.LAST, ckpt.PREV, "step-0000002.pt", ckpt.BEST):
        with open(tmp_path / name, "wb") as f:
            f.truncate(best if name == ckpt.BEST else last)
    os.link(tmp_path / ckpt.LAST, tmp_path / "epoch-001.pt")  # shares last.pt's space: counted once
    need = ckpt.space_needed(tmp_path, last, best, keep_last_n=4, snapshots=3)
    assert 5 * last <= need <= 5 * last + margin


def test_policy_keys_are_validated():
    assert load_config(None, ["train.keep_last_n=1"]).train.keep_last_n == 1
    with pytest.raises(ConfigError, match=r"^train\.keep_last_n: must be >= 1 \(last\.pt\), got 0$"):
        load_config(None, ["train.keep_last_n=0"])
    with pytest.raises(ConfigError, match=r"^train\.snapshot_every_epochs: must be >= 0, got -1$"):
        load_config(None, ["train.snapshot_every_epochs=-1"])


def test_the_writer_keeps_only_last_pt_with_keep_last_n_1_and_prunes_when_the_policy_shrinks(tmp_path):
    writer = ckpt.CheckpointWriter(asynchronous=False)

    def save(step: int, keep: int) -> dict[str, int | None]:
        payload = {"global_step": step, "w": ckpt.to_host(torch.full((4,), float(step)))}
        writer.submit([ckpt.Write(payload, tmp_path / ckpt.LAST, keep_previous=True, step=step, keep_last_n=keep)])
        return checkpoint_files(tmp_path)

    assert [save(s, 4) for s in (1, 2, 3, 4, 5)][-1] == {
        "last.pt": 5,
        "last.prev.pt": 4,
        "step-0000002.pt": 2,
        "step-0000003.pt": 3,
    }
    assert save(6, 2) == {"last.pt": 6, "last.prev.pt": 5}  # the policy shrank: the rolled ones go
    assert save(7, 1) == {"last.pt": 7}
    assert save(8, 1) == {"last.pt": 8}
