"""Preemption as users meet it: the shipped loader workers, the signals SLURM, torchrun, `timeout` and a
terminal really send, the launcher dying, two runs on one directory, a refused resume.

Every trial runs the real CLI with `data.workers=2` (DataLoader worker processes, like the shipped
default of 4) and checks, on top of a clean stop: a checkpoint at the current step, one line per rank,
every process out within seconds, exit status 75 (bfly.job.exits.EXIT_STOPPED; torchrun reports it in
its failure summary) and a resume that ends bit-identical to an uninterrupted run.

Default tier: a SIGTERM to a DDP job's whole process group, a Ctrl-C on a terminal, kill -9 of the
torchrun agent, the run-directory lock, refused resumes. Slow tier: every stop signal to every kind of
target.
"""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from bfly.core import checkpoint as ckpt
from bfly.job.exits import EXIT_STOPPED
from bfly.job.train import main
from bfly.run.rundir import LOCK, Holder, RunDirBusy, RunDirLock, this_process

from conftest import TEST_MODEL, our_frames, read_jsonl
from probes.fault_launch import STEPS, Launch, fault_args, paced, run_to_end, torchrun_cmd, train_cmd
from test_faults import assert_nothing_lost, torchrun_exit_codes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals and /proc")

WORKERS = {"data.workers": 2}
# The test model's steps take milliseconds: rank 0 is paced (every rank waits for it) so that a stop sent
# after step 2 lands in the first half of the epoch, as a stop sent at a step does in a real run.
PACED = paced(0.3)


def stop_and_check(launch: Launch, run: Path, nproc: int, send, name: str, log_every: int = 1) -> int:
    """Sends the stop with `send()` after step 2; checks the stop; returns the checkpoint's step."""
    launch.wait_step(2)
    sent = time.monotonic()
    send()
    rc = launch.wait(90)
    took = time.monotonic() - sent
    out = launch.output
    m = launch.wait_for(rf"^stopped by ({name}|a signal on another rank): checkpoint at epoch 1 step (\d+) written")
    step = int(m[2])
    assert 2 <= step < STEPS // 2 and step % log_every == 0, (step, out[-3000:])
    for rank in range(1, nproc):
        assert re.search(rf"^\[rank {rank}\] stopped by .*: checkpoint at epoch 1 step {step} written", out, re.M), out[
            -3000:
        ]
    assert "collective failed" not in out and "DataLoader worker" not in out, out[-4000:]
    assert "KeyboardInterrupt" not in out and not our_frames(out), out[-4000:]  # no trainer traceback
    assert took < 30, f"processes still running {took:.0f}s after the signal"
    saved = torch.load(run / ckpt.LAST, weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, step)
    assert not (run / f".{ckpt.LAST}.tmp").exists()
    print(f"{name}: checkpoint at step {step}, rc {rc}, every process out {took:.1f}s after the signal")
    return rc


def resume_and_compare(run: Path, ref: Path, data: Path, nproc: int) -> None:
    cmd = train_cmd if nproc == 1 else lambda a: torchrun_cmd(nproc, a)
    resumed = run_to_end(cmd(fault_args(data, run, **WORKERS)))
    assert f"resumed from {run / ckpt.LAST}: epoch 1, step" in resumed.output
    assert_nothing_lost(run, ref)


# --- signals as their senders send them --------------------------------------------------------------


def test_sigterm_to_the_whole_process_group_of_a_ddp_job_with_loader_workers(tiny_data, tmp_path, ref2):
    """What SLURM does on preemption, `scancel` and `scontrol requeue`, and `timeout` for its child."""
    run = tmp_path / "run"
    launch = Launch(torchrun_cmd(2, fault_args(tiny_data, run, **WORKERS)), timeout=300, env=PACED)
    stop_and_check(launch, run, 2, lambda: launch.signal_group(signal.SIGTERM), "SIGTERM")
    # torchrun's agent got the SIGTERM too: it exits through its own SignalException, whatever the workers say.
    resume_and_compare(run, ref2, tiny_data, 2)


@pytest.mark.slow
def test_ctrl_c_on_a_terminal_stops_with_a_checkpoint_and_no_traceback(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    launch = Launch(train_cmd(fault_args(tiny_data, run, **WORKERS)), timeout=300, tty=True, env=PACED)
    rc = stop_and_check(launch, run, 1, launch.ctrl_c, "SIGINT")
    assert rc == EXIT_STOPPED
    assert "Traceback" not in launch.output, launch.output[-4000:]
    resume_and_compare(run, ref1, tiny_data, 1)


@pytest.mark.slow
def test_a_trainer_whose_torchrun_agent_is_killed_checkpoints_and_exits(tiny_data, tmp_path, ref2):
    """kill -9 of the agent: the parent-death signal turns it into a SIGTERM for each trainer."""
    run = tmp_path / "run"
    launch = Launch(torchrun_cmd(2, fault_args(tiny_data, run, **WORKERS)), timeout=300)
    launch.wait_step(2)
    trainers = list(launch.workers(2).values())
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.wait(30)
    deadline = time.monotonic() + 60
    while any(
        Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[1][:3]
        for p in trainers
    ):
        assert time.monotonic() < deadline, "trainers outlived their launcher"
        time.sleep(0.2)
    launch._reader.join(10)
    m = launch.wait_for(r"^stopped by (SIGTERM|a signal on another rank): checkpoint at epoch 1 step (\d+) written")
    saved = torch.load(run / ckpt.LAST, weights_only=True)
    assert saved["global_step"] == int(m[2])
    resume_and_compare(run, ref2, tiny_data, 2)


SENDERS = {
    "group": lambda launch, nproc: launch.signal_group,
    "agent": lambda launch, nproc: lambda sig: os.kill(launch.proc.pid, sig),
    "trainers": lambda launch, nproc: lambda sig: [os.kill(p, sig) for p in launch.workers(nproc).values()],
}
MATRIX = [(sig, target) for sig in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") for target in SENDERS]


@pytest.mark.slow
@pytest.mark.parametrize("sig,target", MATRIX, ids=[f"{s}-{t}" for s, t in MATRIX])
def test_every_stop_signal_to_every_target_with_loader_workers(tiny_data, tmp_path, ref2, sig, target):
    run = tmp_path / "run"
    launch = Launch(torchrun_cmd(2, fault_args(tiny_data, run, **WORKERS)), timeout=300, env=PACED)
    signum = getattr(signal, sig)
    # The agent dies of a SIGUSR1/2 (torchrun does not handle them): the trainers see the SIGTERM of
    # their parent's death (sent to the group, whichever of the two reaches them first).
    name = sig
    if sig in ("SIGUSR1", "SIGUSR2") and target != "trainers":
        name = "SIGTERM" if target == "agent" else f"(?:{sig}|SIGTERM)"
    stop_and_check(launch, run, 2, lambda: SENDERS[target](launch, 2)(signum), name)
    if target == "trainers":
        assert torchrun_exit_codes(launch.output) == {0: EXIT_STOPPED, 1: EXIT_STOPPED}
    resume_and_compare(run, ref2, tiny_data, 2)


@pytest.mark.slow
def test_sigterm_to_a_single_process_under_timeout_exits_75(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    launch = Launch(
        ["timeout", "-s", "TERM", "1000", *train_cmd(fault_args(tiny_data, run, **WORKERS))], timeout=300, env=PACED
    )
    rc = stop_and_check(launch, run, 1, lambda: launch.signal_group(signal.SIGTERM), "SIGTERM")
    assert rc == EXIT_STOPPED and "Traceback" not in launch.output
    resume_and_compare(run, ref1, tiny_data, 1)


@pytest.mark.slow
def test_a_second_signal_during_the_checkpoint_write_changes_nothing(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    launch = Launch(train_cmd(fault_args(tiny_data, run, **WORKERS)), timeout=300, env=PACED)

    def twice() -> None:
        launch.signal_group(signal.SIGTERM)
        time.sleep(0.3)  # the trainer is at the step's end, copying or writing the checkpoint
        launch.signal_group(signal.SIGINT)
        launch.signal_group(signal.SIGTERM)

    assert stop_and_check(launch, run, 1, twice, "SIGTERM") == EXIT_STOPPED
    ckpt.load(run / ckpt.LAST)  # complete and CRC-clean
    resume_and_compare(run, ref1, tiny_data, 1)


# --- one run per run directory ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_directory_is_refused_at_start_up(tiny_data, tmp_path, ref1):
    run = tmp_path / "run"
    # Paced (a second per step: every step still exact) so that it still trains when the second run starts.
    first = Launch(train_cmd(fault_args(tiny_data, run, **WORKERS)), timeout=300, env=paced(1))
    first.wait_step(1)
    t0 = time.monotonic()
    second = Launch(train_cmd(fault_args(tiny_data, run)), timeout=120)
    assert second.wait() == 2
    took = time.monotonic() - t0
    errors = [ln for ln in second.output.splitlines() if ln.startswith("bfly.train: error")]
    assert len(errors) == 1, second.output
    holder = f"host {os.uname().nodename}, pid {first.proc.pid}, since "
    assert errors[0].startswith(f"bfly.train: error: run directory {run} is in use by another run ({holder}"), errors
    assert took < 30
    assert first.wait() == 0, first.output[-3000:]  # the first run did not notice
    assert_nothing_lost(run, ref1)
    assert not (run / LOCK).exists()  # released at exit


def holder(**changes) -> Holder:
    me = this_process(None)
    return Holder(**{**me.__dict__, **changes})


def write_lock(run: Path, h: Holder, age_s: float = 0.0) -> None:
    run.mkdir(exist_ok=True)
    (run / LOCK).write_text(json.dumps(h.__dict__))
    t = time.time() - age_s
    os.utime(run / LOCK, (t, t))


@pytest.mark.parametrize("case", ["dead pid", "recycled pid", "rebooted host", "same SLURM job", "silent host"])
def test_a_lock_left_by_a_dead_holder_is_taken_over(tmp_path, case):
    stale = {
        "dead pid": (holder(pid=2**22 + 7), 0),
        "recycled pid": (holder(pid=1, start_ticks=123456789), 0),  # pid 1 runs, but started at another time
        "rebooted host": (holder(boot_id="another-boot"), 0),
        "same SLURM job": (holder(host="node17", slurm_job="4242"), 0),
        "silent host": (holder(host="node17"), 600),
    }[case]
    write_lock(tmp_path, *stale)
    me = this_process("4242")
    lock = RunDirLock(tmp_path, me)
    note = lock.acquire()
    assert note and note.startswith(f"took over the lock of {tmp_path} from "), note
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_held_by_a_live_run_elsewhere_is_respected(tmp_path):
    write_lock(tmp_path, holder(host="node17", pid=99, slurm_job="1"), age_s=5)
    with pytest.raises(RunDirBusy, match=r"is in use by another run \(host node17, pid 99, SLURM job 1, since "):
        RunDirLock(tmp_path, this_process("2")).acquire()


# --- a refused or failed run changes nothing ----------------------------------------------------------


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


REFUSED = {
    "another model": ({"model.name": "vgg19_bn"}, rf"checkpoint is a {TEST_MODEL} model, this run builds vgg19_bn"),
    "another lr": ({"optim.lr": 0.5}, r"optim\.lr: 0\.05 -> 0\.5"),
    "another batch": ({"train.batch_size": 6}, r"train\.batch_size: 12 -> 6"),
    "two changes": (
        {"optim.lr": 0.5, "train.seed": 3},
        r"optim\.lr: 0\.05 -> 0\.5; train\.seed: 0 -> 3; .*"
        r"run\.allow_changes=\[optim\.lr,train\.seed\]",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_resume_leaves_every_file_of_the_run_directory_byte_identical(stopped_run, tiny_data, capsys, case):
    before = snapshot(stopped_run)
    changes, pattern = REFUSED[case]
    assert main(fault_args(tiny_data, stopped_run, **changes)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bfly.train: error: ") and re.search(pattern, err[0]), err
    assert snapshot(stopped_run) == before


def test_an_edited_config_yaml_is_not_discarded_silently(stopped_run, tiny_data, capsys):
    path = stopped_run / "config.yaml"
    path.write_text(path.read_text().replace("lr: 0.05", "lr: 0.3"))
    before = snapshot(stopped_run)
    assert main(fault_args(tiny_data, stopped_run)) == 2
    err = capsys.readouterr().err
    assert f"{path} was edited after its checkpoint (optim.lr: 0.05 -> 0.3)" in err
    assert f"start with --config {path}" in err
    assert snapshot(stopped_run) == before


def test_a_run_that_fails_on_a_bad_image_after_start_up_changes_only_train_log(
    stopped_run, tiny_data, tmp_path, capsys
):
    from conftest import data_copy
    from probes.fault_launch import replace_image

    data = data_copy(tiny_data, tmp_path / "data")
    saved = torch.load(stopped_run / ckpt.LAST, weights_only=True)
    from bfly.core.data.sampling import StepPlan, rank_micro_batches

    step = saved["step_in_epoch"]
    index = list(rank_micro_batches(60, StepPlan.make(12, 1, 0), 0, 0, 0))[step][0].index
    bad = replace_image(data, "train", index, "bad.jpg", b"not a jpeg")
    before = snapshot(stopped_run)
    # Same images count and names: the data identity is unchanged, only one file is broken.
    assert main(fault_args(data, stopped_run)) == 2
    assert str(bad) in capsys.readouterr().err
    after = snapshot(stopped_run)
    log = after.pop("train.log")
    # attempts.jsonl records every start that passed the start-up checks, this one (a user error) included.
    attempts = after.pop("attempts.jsonl")
    assert attempts.startswith(before.get("attempts.jsonl", b"")) and b'"user error"' in attempts
    assert after == {k: v for k, v in before.items() if k not in ("train.log", "attempts.jsonl")}
    assert log.startswith(before["train.log"]) and str(bad).encode() in log[len(before["train.log"]) :]


# --- allowed and operational changes on resume ---------------------------------------------------------


@pytest.mark.slow
def test_an_allowed_change_is_applied_logged_and_kept_in_the_history(stopped_run, tiny_data):
    args = fault_args(
        tiny_data,
        stopped_run,
        **{"optim.lr": 0.5, "run.allow_changes": "[optim.lr]", "data.workers": 1, "train.log_every": 2},
    )
    assert main(args) == 0
    log = (stopped_run / "train.log").read_text()
    assert "config changed on resume at global step 3 (run.allow_changes): optim.lr: 0.05 -> 0.5" in log
    assert "data.workers" not in log.split("config changed", 1)[1].splitlines()[0]  # operational: silent
    (entry,) = read_jsonl(stopped_run / "config_history.jsonl")
    assert entry["global_step"] == 3 and entry["changes"] == {"optim.lr": {"old": 0.05, "new": 0.5}}
    saved = torch.load(stopped_run / ckpt.LAST, weights_only=True)
    assert saved["config"]["optim"]["lr"] == 0.5
    assert "lr: 0.5" in (stopped_run / "config.yaml").read_text()


def test_a_dataset_whose_ids_map_to_other_species_is_refused(stopped_run, tiny_data, tmp_path, capsys):
    import pandas as pd

    data = tmp_path / "renamed"
    data.mkdir()
    for split in ("train", "valid", "test"):  # ids 0 and 1 swap species; every image keeps its species
        df = pd.read_csv(tiny_data / f"{split}.csv")
        df["label_id"] = df["label_id"].map(lambda i: {0: 1, 1: 0}.get(i, i))
        df.to_csv(data / f"{split}.csv", index=False)
        (data / split).symlink_to((tiny_data / split).resolve(), target_is_directory=True)
    assert main(fault_args(data, stopped_run)) == 2
    err = capsys.readouterr().err
    assert re.search(r"data\.class_names\[0\]: '.+' -> '.+'", err), err


# --- a disk that fills up during a save -----------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_during_a_save_names_the_intact_checkpoint_and_the_resume_is_exact(tiny_data, tmp_path, ref1):
    from test_faults import run_with_private_mounts

    out = run_with_private_mounts(
        "full_disk.py", [str(tmp_path), *fault_args(tiny_data, Path("unused"), **WORKERS)], timeout=400
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    run = tmp_path / "disk" / "run"
    assert r["filled"]["step"] == 2 and r["rc"] == 2, r["output"][-3000:]
    errors = [ln for ln in r["output"].splitlines() if ln.startswith("bfly.train: error")]
    assert errors == [
        f"bfly.train: error: no space left on device while writing last.pt in {run}; last.pt (step 2) is intact"
    ], r["output"][-3000:]
    assert "Traceback" not in r["output"]
    assert ".last.pt.tmp" not in r["files"] and r["intact_step"] == 2
    # After space is freed the resume is accepted (the free-space check counts the files already there).
    assert r["resume_rc"] == 0, r["resume_output"][-3000:]
    assert f"resumed from {run / ckpt.LAST}: epoch 1, step 2 of the epoch, global step 2" in r["resume_output"]
    assert_nothing_lost(tmp_path / "out", ref1)
    print(f"full disk at the step-4 save: exit 2 after {r['seconds']:.1f}s, last.pt (step 2) intact; resume exact")
