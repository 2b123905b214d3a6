"""A rank that stops making progress is found, named, its stacks written, and the job ended (exit 76).

Real processes, real torchrun, gloo on CPU, two DataLoader workers per trainer; the stalls are real
(SIGSTOP of a trainer or of a loader worker, SIGKILL of torchrun's agent) or a trainer sleeping where a
real stall would be (BFLY_TEST_STALL, bfly.job.faults). Limits are short (run.hang_timeout_s=5).
For each: the exit status, the seconds from the stall to the job's end, the rank the line names, the
stuck frame in the stack files, no process left behind (/proc), and a resume afterwards that ends
bit-identical to an uninterrupted run. A slow rank, a long evaluation and a long checkpoint write are
not hangs.

Default tier: one process stalled in its data path, and the settings. Slow tier: the torchrun trials
(`pytest -m slow tests/test_hangs.py`, about 2 minutes each on 2 CPU cores).
"""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from bfly.core.config import load_config
from bfly.core.env import DistEnv, StallHook, fault_spec
from bfly.job.exits import EXIT_HANG
from bfly.job.hang import Seen
from bfly.job.watchdog import (
    STEP_MULTIPLE,
    WARM_STEPS,
    Heartbeat,
    Limits,
    Watchdog,
    configure_nccl,
    nccl_settings,
)
from bfly.tools.child import descendants

from conftest import PYTHON, REPO, assert_same_weights, read_jsonl
from probes.fault_launch import (
    Launch,
    fault_args,
    paced,
    progress_step,
    run_to_end,
    torchrun_cmd,
    train_cmd,
)
from test_faults import assert_nothing_lost

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

HANG_S = 5
# The stalls come at global step 4 or later: past this job's first WARM_STEPS steps, which keep the
# start-up limit.
STALL_STEP = 4


# A trainer stopped from outside (SIGSTOP) is stopped minutes into a real run, when every rank has heard
# of every other; the test model's steps take milliseconds, so these trials pace rank 0 at half a second
# a step (every rank waits for it) to stop a trainer past its first heartbeats, as a real stall would be.
PACED = paced(0.5)


def hang_args(data: Path, run: Path, **extra) -> list[str]:
    return fault_args(
        data,
        run,
        **{"data.workers": 2, "run.hang_timeout_s": HANG_S, "run.startup_timeout_s": 60, "run.stop_grace_s": 10}
        | extra,
    )


def stall(rank: int, phase: str, step: int | str = STALL_STEP, seconds: float = 600) -> dict[str, str]:
    return {"BFLY_TEST_STALL": f"{rank}:{phase}:{step}:{seconds}"}


def assert_nothing_left(launch: Launch, pids: list[int]) -> None:
    """Every process of the launch is gone: trainers, loader workers, the agent."""
    deadline = time.monotonic() + 10
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
        if not alive:
            return
        time.sleep(0.2)
    for p in alive:  # leave nothing behind for the next test
        os.kill(p, signal.SIGKILL)
    raise AssertionError(f"processes left behind: {alive}")


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def catches_sigterm(pid: int) -> bool:
    """The process has its own SIGTERM handler (a trainer past its imports: bfly.stopping is installed)."""
    try:
        caught = next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt")
        )
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def hang_line(out: str) -> str:
    lines = [line for line in out.splitlines() if re.search(r"\]: hang: ", line)]
    assert len(lines) == 1, out[-6000:]  # one line, from one rank
    return lines[0]


def assert_one_hang_line_in_train_log(run: Path, line: str) -> None:
    logged = [x for x in (run / "train.log").read_text().splitlines() if "hang: no rank has made progress" in x]
    assert len(logged) == 1 and logged[0].endswith(line.split("]: ", 1)[1]), logged


def stack_file(run: Path, rank: int) -> str:
    files = sorted((run / "hang").glob(f"rank{rank}-*.txt"))
    assert len(files) == 1, list((run / "hang").iterdir()) if (run / "hang").exists() else "no hang folder"
    return files[0].read_text()


def main_thread_stack(text: str) -> str:
    """The stack of the thread that was not the watchdog's and not a helper's: the one running bfly.train."""
    for block in text.split("\n\n"):
        if "bfly/job/train.py" in block and "in _command" in block:
            return block
    raise AssertionError(f"no main-thread stack in:\n{text[:3000]}")


# --- default tier ---------------------------------------------------------------------------------------


def test_a_single_process_stalled_in_its_data_path_is_named_dumped_and_ended(tiny_data, tmp_path):
    run = tmp_path / "run"
    launch = Launch(train_cmd(hang_args(tiny_data, run)), timeout=240, env=stall(0, "data"))
    launch.wait_step(STALL_STEP - 1)
    pids = [launch.proc.pid, *descendants(launch.proc.pid)]
    stalled = time.monotonic()
    assert launch.wait(HANG_S * STEP_MULTIPLE + 120) == EXIT_HANG, launch.output[-4000:]
    took = time.monotonic() - stalled
    line = hang_line(launch.output)
    assert re.search(rf"stalled: rank 0 \(\S+, pid {launch.proc.pid}\), waiting for data", line), line
    assert f"last step {STALL_STEP}," in line and f"exit {EXIT_HANG}" in line
    assert line.split("]: ", 1)[1] in (run / "train.log").read_text()  # the same line in train.log
    stack = main_thread_stack(stack_file(run, 0))
    assert "in stall_for_test" in stack and "in watched" in stack and "in train_one_epoch" in stack, stack
    assert_nothing_left(launch, pids)
    print(f"data stall, 1 process: exit {EXIT_HANG} {took:.0f} s after step {STALL_STEP - 1}'s line; {line}")


def test_the_limits_are_config_keys_with_documented_defaults():
    cfg = load_config(None, [])
    assert (cfg.run.hang_timeout_s, cfg.run.startup_timeout_s, cfg.run.stop_grace_s) == (300, 540, 120)
    # Both limits are below the collective timeout, so the watchdog names a hang before a collective fails.
    assert cfg.run.hang_timeout_s < cfg.dist.timeout_s and cfg.run.startup_timeout_s < cfg.dist.timeout_s
    with pytest.raises(ValueError, match=r"run\.hang_timeout_s: must be >= 0"):
        load_config(None, ["run.hang_timeout_s=-1"])
    with pytest.raises(ValueError, match=r"run\.startup_timeout_s: must be > 0"):
        load_config(None, ["run.startup_timeout_s=0"])


def test_the_limit_is_the_start_up_one_at_first_then_the_larger_of_the_timeout_and_ten_steps():
    limits = Limits(hang_s=300, startup_s=540, stop_grace_s=120)
    beat = Heartbeat()
    assert beat.limit(limits) == 540  # start-up
    for step in range(1, WARM_STEPS + 1):
        assert beat.limit(limits) == 540  # the first compiled steps
        beat.enter("forward-backward")
        beat.step_done(step)
    assert beat.limit(limits) == 300
    beat.step_times.extend([45.0] * 10)  # a slow machine: 45 s per step
    assert beat.limit(limits) == STEP_MULTIPLE * 45.0
    with beat.during("checkpoint"):
        assert beat.limit(limits) == 540


def test_the_backstop_for_a_stuck_interpreter_lies_past_the_collective_timeout(tmp_path):
    """A job suspended for longer than the hang limit goes on; the interpreter's own timer (its clock runs on
    while the process is stopped) ends a process only past dist.timeout_s, when collectives time out too."""
    beat = Heartbeat()
    for step in range(1, WARM_STEPS + 2):
        beat.enter("forward-backward")
        beat.step_done(step)
    dog = Watchdog(beat, DistEnv(0, 0, 1, 1, "single", "env://"), Limits(5, 60, 10, 600), tmp_path, None, None)
    assert dog.backstop_s(beat.since) >= 600 + 5
    assert dog.backstop_s(beat.since + 1_000) >= 600  # past the limit already: still dist.timeout_s away
    short = Watchdog(beat, DistEnv(0, 0, 1, 1, "single", "env://"), Limits(5, 60, 10, 30), tmp_path, None, None)
    assert short.backstop_s(beat.since) >= 120  # never less than 2 minutes past the limit


def test_the_watchdog_polls_every_second_until_it_has_heard_of_every_rank(tmp_path):
    """A rank stopped in its first steps is then known by its record (host, step, phase), whatever the limits."""
    limits = Limits(hang_s=60, startup_s=540, stop_grace_s=120)
    dog = Watchdog(Heartbeat(), DistEnv(0, 0, 2, 2, "torchrun", "env://"), limits, tmp_path, None, None)
    assert limits.poll_s == 10 and dog.interval() == 1.0
    dog.seen[0] = Seen({"rank": 0}, 0.0)
    assert dog.interval() == 1.0
    dog.seen[1] = Seen({"rank": 1}, 0.0)
    assert dog.interval() == 10


def test_the_stall_hook_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("BFLY_TEST_STALL", "1:data:4:600,0:eval:*:2.5")
    assert fault_spec().stalls == (StallHook(1, "data", 4, 600.0), StallHook(0, "eval", None, 2.5))


def test_nccl_settings_agree_with_the_watchdog_and_the_users_own_win(tmp_path, monkeypatch):
    settings = nccl_settings(tmp_path, timeout_s=600)
    assert settings["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # a timed-out collective ends the process
    assert settings["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(settings["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert settings["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "hang" / "nccl-trace-rank")
    assert int(settings["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 600  # after the collective timeout
    for name in settings:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "500")
    applied = configure_nccl(tmp_path, 600)
    assert applied["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"  # the user's
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert applied == {name: os.environ[name] for name in settings}


# --- slow tier: torchrun ----------------------------------------------------------------------------------


def hang_and_resume(data: Path, run: Path, ref: Path, env: dict[str, str], act=None) -> tuple[str, float]:
    """Runs the torchrun job until `act(launch)` (which stalls a process) or the hook's stall, checks that it
    ends with EXIT_HANG in time with nothing left, then resumes it to the end, bit-identical to `ref`.
    Returns the hang line and the seconds from the stall to the end."""
    launch = Launch(torchrun_cmd(2, hang_args(data, run)), timeout=480, env=(PACED | env) if act else env)
    launch.wait_step(STALL_STEP - 1)
    pids = [launch.proc.pid, *descendants(launch.proc.pid)]
    if act:
        act(launch)
    stalled = time.monotonic()
    rc = launch.wait(HANG_S * STEP_MULTIPLE + 150)
    took = time.monotonic() - stalled
    # torchrun reports a worker's failure as its own (exit 1); its summary names the workers' status.
    assert rc == 1 and re.search(rf"exitcode\s+: {EXIT_HANG}", launch.output), launch.output[-6000:]
    assert "collective failed" not in launch.output, launch.output[-6000:]
    line = hang_line(launch.output)
    assert_one_hang_line_in_train_log(run, line)
    assert_nothing_left(launch, pids)
    steps = [s for s in map(progress_step, launch.output.splitlines()) if s is not None]
    assert max(steps) <= STALL_STEP + 1
    resumed = run_to_end(torchrun_cmd(2, hang_args(data, run)), timeout=300)
    assert "resumed from" in resumed.output
    assert_nothing_lost(run, ref)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]
    limit = float(re.search(r"\(limit (\d+) s\)", line)[1])  # type: ignore[index]
    assert took < limit + 60, (took, limit)  # the limit: run.hang_timeout_s, or 10 x the median step if longer
    return line, took


@pytest.mark.slow
def test_a_stopped_trainer_is_named_and_the_job_ended(tiny_data, tmp_path, ref2):
    run = tmp_path / "run"
    stopped = {}

    def sigstop_rank_1(launch: Launch) -> None:
        launch.wait_step(STALL_STEP)
        stopped["pid"] = launch.workers(2)[1]
        os.kill(stopped["pid"], signal.SIGSTOP)

    line, took = hang_and_resume(tiny_data, run, ref2, {}, sigstop_rank_1)
    assert re.search(rf"stalled: rank 1 \(\S+, pid {stopped['pid']}\) is stopped \(process state T\)", line), line
    stack = main_thread_stack(stack_file(run, 0))  # rank 0 waits for it in a collective
    assert re.search(r"line \d+ in (all_reduce|all_gather|wait_tensor|backward)\n", stack), stack  # DDP, SyncBN
    assert not list((run / "hang").glob("rank1-*"))  # a stopped process writes nothing
    assert took < HANG_S + 60
    print(f"SIGSTOP rank 1: ended {took:.0f} s after the stall; {line}")


@pytest.mark.slow
def test_a_stopped_rank_0_which_serves_the_heartbeat_store_is_named_and_the_job_ended(tiny_data, tmp_path, ref2):
    """With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 rank 0's process serves the store the heartbeats go through:
    stopped, it answers nothing. Rank 1 takes the store's silence as evidence against rank 0 and names it."""
    run = tmp_path / "run"
    stopped = {}

    def sigstop_rank_0(launch: Launch) -> None:
        launch.wait_step(STALL_STEP)
        stopped["pid"] = launch.workers(2)[0]
        os.kill(stopped["pid"], signal.SIGSTOP)

    line, took = hang_and_resume(tiny_data, run, ref2, {}, sigstop_rank_0)
    assert "[rank 1]: hang: " in line, line
    assert re.search(
        rf"stalled: rank 0 \(\S+, pid {stopped['pid']}\), which serves the heartbeat store, is stopped "
        r"\(process state T\), (in \S+|waiting for data) when last heard \d+ s ago, last step \d+, \d+ s since its "
        r"last progress; stacks",
        line,
    ), line
    assert not list((run / "hang").glob("rank0-*"))  # a stopped process writes nothing
    assert took < HANG_S + 60
    print(f"SIGSTOP rank 0 (the store's host): ended {took:.0f} s after the stall; {line}")


def loader_workers(trainer: int) -> list[int]:
    return [p for p in descendants(trainer) if Path(f"/proc/{p}/cmdline").read_bytes().count(b"bfly.train")]


@pytest.mark.slow
@pytest.mark.parametrize("stopped", ["rank 1", "rank 0", "the loader workers of rank 1"])
def test_a_stall_under_max_restarts_is_restarted_after_a_line_that_names_it(tiny_data, tmp_path, ref2, stopped):
    """torchrun --max-restarts=1 (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, no BFLY_EXIT_STATUS_DIR), one process
    stopped: the hang is named once, the trainers are restarted, the restart line names the hang's rank, host
    and step, and the run ends as an uninterrupted one."""
    run = tmp_path / "run"
    launch = Launch(torchrun_cmd(2, hang_args(tiny_data, run), max_restarts=1), timeout=600, env=PACED)
    launch.wait_step(STALL_STEP)
    first = launch.workers(2)
    pids = [*first.values(), *(p for w in first.values() for p in descendants(w))]
    rank = 0 if stopped == "rank 0" else 1
    targets = loader_workers(first[1]) if "loader" in stopped else [first[rank]]
    for pid in targets:
        os.kill(pid, signal.SIGSTOP)
    stalled = time.monotonic()
    restart = launch.wait_for(r"restart 1 of 1 inside this job .* after: .*", timeout=HANG_S + 120)
    took = time.monotonic() - stalled
    line = hang_line(launch.output)
    if "loader" in stopped:
        named = (
            rf"rank 1 \(\S+, pid {first[1]}\), waiting for data from loader worker\(s\) pid {targets[0]} \(stopped\)"
        )
    else:
        named = rf"rank {rank} \(\S+, pid {first[rank]}\)(, which serves the heartbeat store,)? is stopped \(process"
    assert re.search(rf"stalled: {named}", line), line
    host = re.search(rf"stalled: rank {rank} \((\S+),", line)[1]  # type: ignore[index]
    assert re.search(rf"after: hang on rank {rank} \({host}\) at step \d+$", restart[0]), restart[0]
    assert_nothing_left(launch, pids)  # the first round's trainers and loader workers
    assert launch.wait() == 0, launch.output[-6000:]
    assert_one_hang_line_in_train_log(run, line)
    assert_nothing_lost(run, ref2)
    limit = float(re.search(r"\(limit (\d+) s\)", line)[1])  # type: ignore[index]
    assert took < limit + 60, (took, limit)
    print(f"SIGSTOP {stopped} under --max-restarts=1: restarted {took:.0f} s after the stall; {line}; {restart[0]}")


@pytest.mark.slow
def test_a_job_suspended_as_a_whole_for_longer_than_the_limit_goes_on_to_the_same_result(tiny_data, tmp_path, ref2):
    """SIGSTOP to every process of the job (as scontrol suspend and Ctrl-Z do) for 130 s (limit 5 s, or 10 x
    the median step: longer than the limit + 2 minutes), then SIGCONT: no hang, and the run ends as an
    uninterrupted one. (Whether the backstop's timer fires before the watchdog re-arms it after such a
    pause is a race; the test below checks that it lies past dist.timeout_s.)"""
    run = tmp_path / "run"
    launch = Launch(torchrun_cmd(2, hang_args(tiny_data, run)), timeout=600)
    launch.wait_step(STALL_STEP)
    os.killpg(launch.proc.pid, signal.SIGSTOP)
    time.sleep(130)
    os.killpg(launch.proc.pid, signal.SIGCONT)
    assert launch.wait() == 0, launch.output[-6000:]
    assert "hang" not in launch.output and not (run / "hang").exists(), launch.output[-6000:]
    assert_nothing_lost(run, ref2)
    print("whole job suspended for 130 s (limit 5 s): went on, finished, same weights as uninterrupted")


@pytest.mark.slow
def test_a_trainer_sleeping_in_its_data_path_is_named_waiting_for_data(tiny_data, tmp_path, ref2):
    run = tmp_path / "run"
    line, took = hang_and_resume(tiny_data, run, ref2, stall(1, "data"))
    assert re.search(r"stalled: rank 1 \(\S+, pid \d+\), waiting for data", line), line
    assert f"last step {STALL_STEP}," in line
    assert "in stall_for_test" in main_thread_stack(stack_file(run, 1))
    assert "in train_one_epoch" in main_thread_stack(stack_file(run, 0))
    print(f"rank 1 asleep in its data path: ended {took:.0f} s after step {STALL_STEP - 1}; {line}")


@pytest.mark.slow
def test_a_stopped_loader_worker_is_named_with_its_pid(tiny_data, tmp_path, ref2):
    run = tmp_path / "run"
    stopped = {}

    def sigstop_a_worker_of_rank_1(launch: Launch) -> None:
        trainer = launch.workers(2)[1]
        workers = [p for p in descendants(trainer) if Path(f"/proc/{p}/cmdline").read_bytes().count(b"bfly.train")]
        stopped["pids"] = workers
        for pid in workers:  # both: the trainer cannot get its next batch from either
            os.kill(pid, signal.SIGSTOP)

    line, took = hang_and_resume(tiny_data, run, ref2, {}, sigstop_a_worker_of_rank_1)
    assert re.search(r"stalled: rank 1 \(\S+, pid \d+\), waiting for data from loader worker", line), line
    for pid in stopped["pids"]:
        assert f"pid {pid} (stopped)" in line, line
    assert "_get_data" in main_thread_stack(stack_file(run, 1)) or "in get" in stack_file(run, 1)
    print(f"loader workers of rank 1 stopped: ended {took:.0f} s after the stall; {line}")


@pytest.mark.slow
def test_a_trainer_that_never_reaches_the_rendezvous_is_named(tiny_data, tmp_path):
    run = tmp_path / "run"
    startup = 20
    args = hang_args(tiny_data, run, **{"run.startup_timeout_s": startup})
    launch = Launch(torchrun_cmd(2, args), timeout=300, env=stall(1, "startup", 0))
    workers = launch.workers(2)
    t0 = time.monotonic()
    pids = [launch.proc.pid, *workers.values()]
    rc = launch.wait(startup + 120)
    took = time.monotonic() - t0
    assert rc == 1 and re.search(rf"exitcode\s+: {EXIT_HANG}", launch.output), launch.output[-6000:]
    line = hang_line(launch.output)
    assert re.search(rf"stalled: rank 1 \(\S+, pid {workers[1]}\), has not reached the rendezvous", line), line
    assert "in stall_for_test" in main_thread_stack(stack_file(run, 1))
    assert "init_process_group" in main_thread_stack(stack_file(run, 0))  # rank 0 waits in the rendezvous
    assert_nothing_left(launch, pids)
    assert took < startup + 60
    print(f"rank 1 never reaches the rendezvous: ended {took:.0f} s after the start (limit {startup} s); {line}")


@pytest.mark.slow
def test_trainers_blocked_in_start_up_do_not_survive_their_agent(tiny_data, tmp_path):
    """SIGKILL of torchrun's agent: the trainers get SIGTERM (parent-death signal) but, blocked in the
    rendezvous, never reach a step; after run.stop_grace_s they write their stacks and end."""
    run = tmp_path / "run"
    grace = 10
    launch = Launch(
        torchrun_cmd(2, hang_args(tiny_data, run, **{"run.stop_grace_s": grace})),
        timeout=300,
        env=stall(1, "startup", 0),
    )
    workers = launch.workers(2)
    pids = list(workers.values())
    deadline = time.monotonic() + 120
    while not all(catches_sigterm(p) for p in pids):  # the trainers' start-up has begun (bfly.job.train.run_job)
        assert time.monotonic() < deadline, launch.output[-3000:]
        time.sleep(0.2)
    time.sleep(3)  # rank 0 in the rendezvous, rank 1 asleep before it
    kids = [p for w in pids for p in descendants(w)]
    killed = time.monotonic()
    launch.proc.kill()
    launch.proc.wait(10)
    deadline = time.monotonic() + grace + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in pids):
        time.sleep(0.2)
    took = time.monotonic() - killed
    launch._reader.join(5)
    assert_nothing_left(launch, pids + kids)
    out = launch.output
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\]: SIGTERM arrived \d+ s ago and could not be honoured", out), out[-4000:]
    assert "in stall_for_test" in main_thread_stack(stack_file(run, 1))
    assert "init_process_group" in main_thread_stack(stack_file(run, 0))
    assert took < grace + 30
    print(f"agent SIGKILLed, trainers blocked in start-up: both gone {took:.0f} s later (grace {grace} s)")


@pytest.mark.slow
def test_a_slow_rank_a_long_evaluation_and_a_long_checkpoint_write_are_not_hangs(tiny_data, tmp_path, ref2):
    """Rank 1 a second slower at every step; rank 0 evaluates for 40 s (every batch in time) and writes one
    checkpoint for 40 s, while the other rank waits, limit 4 s: the run finishes, no hang declared."""
    run = tmp_path / "run"
    stalls = "1:data:*:1.0,0:eval:*:4,0:checkpoint:6:40"
    args = hang_args(tiny_data, run, **{"run.hang_timeout_s": 4, "train.eval_batch_size": 1})
    launch = Launch(torchrun_cmd(2, args), timeout=600, env={"BFLY_TEST_STALL": stalls})
    assert launch.wait() == 0, launch.output[-6000:]
    assert "hang" not in launch.output
    assert not (run / "hang").exists()
    assert_same_weights(
        run / "last.pt", ref2 / "last.pt"
    )  # (evaluation in batches of 1: metrics differ in the last bit)


# --- restarts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_the_sbatch_scripts_keep_torchrun_restarts_out_of_the_shared_store(script):
    text = (REPO / "slurm" / script).read_text()
    assert "\nexport TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in text
    assert text.index("export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") < text.index("-m torch.distributed.run")


@pytest.mark.slow
def test_a_restart_without_the_store_setting_says_so(tiny_data, tmp_path):
    """torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the restarted trainers say so in
    one line; if the restart hangs in the rendezvous (pytorch#135712), the hang is named with that hint."""
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    args = hang_args(tiny_data, run, **{"run.startup_timeout_s": 30})
    launch = Launch([*cmd, "-m", "bfly.train", *args], timeout=400, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})
    launch.wait_step(2)
    os.kill(launch.workers(2)[1], signal.SIGKILL)
    rc = launch.wait()
    warnings = [line for line in launch.output.splitlines() if "without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line]
    assert warnings and warnings[0].startswith("warning: torchrun restarted these workers"), launch.output[-4000:]
    hang = [line for line in launch.output.splitlines() if "]: hang: " in line]
    assert rc == 0 or all("export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun" in h for h in hang), hang
    print(f"restart without the setting: exit {rc}; {warnings[0]}; {hang[0] if hang else 'the restart did not hang'}")
