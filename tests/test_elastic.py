"""Elastic membership: `torchrun --nnodes=MIN:MAX` with a c10d rendezvous keeps a run going when a node
leaves and takes it back when it returns.

Two torchrun agents ("nodes") on this machine meet in one rendezvous, one trainer each. The second
node is killed at once, agent and trainer (as when a machine dies), mid-epoch: the first goes on alone
from last.pt at world size 1 (same global batch, sample order and schedule, as on any resume). The
second node is started again: the job takes it in at world size 2. The run finishes with every epoch
recorded once and the schedule's final step. Slow tier: about 3-6 minutes on 2 busy cores.
"""

import re
import sys
import time

import pytest

from conftest import PYTHON, TEST_MODEL, free_port, read_jsonl
from probes.fault_launch import RESTARTABLE, Launch, fault_args, paced

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc"),
]

EPOCHS = 4
STEPS = 5  # per epoch: 60 images, global batch 12
WORLD = re.compile(rf"^bfly: {TEST_MODEL}, .* (\d+) process\(es\) on cpu")
# Rank 0 waits 0.5 s more for each batch: the test model's steps take milliseconds, and the node going on
# alone must still be training when the lost one comes back (a rendezvous of its own, seconds).
SLOW_STEPS = paced(0.5)


def agent(port: int, hosts_store: bool, args: list[str]) -> Launch:
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nnodes=1:2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=elastic-test",
        # The store's host must stay; a lone node starts after 15 s without a second one.
        f"--rdzv_conf=is_host={int(hosts_store)},last_call_timeout=15",
        "--max-restarts=3",
        "-m",
        "bfly.train",
        *args,
    ]
    return Launch(cmd, timeout=900, env={**RESTARTABLE, **SLOW_STEPS})


def world_sizes(launches: list[Launch], t0: float) -> list[tuple[float, int]]:
    """(seconds since `t0`, world size) at each start of training, whichever node printed it (rank 0's)."""
    starts = [
        (launch.t0 + t - t0, int(m[1])) for launch in launches for t, line in launch.lines if (m := WORLD.match(line))
    ]
    return sorted(starts)


def wait_progress_after(launch: Launch, pattern: str, steps: int) -> None:
    """Waits until `steps` progress lines follow the first line matching `pattern`."""
    marker = re.compile(pattern)
    while True:
        lines = [line for _, line in launch.lines]
        at = next((i for i, line in enumerate(lines) if marker.search(line)), None)
        if at is not None and sum(1 for line in lines[at:] if re.match(r"^epoch \d+/\d+ step ", line)) >= steps:
            return
        if launch.proc.poll() is not None or time.monotonic() > launch.deadline:
            launch.fail(f"no {steps} progress lines after {pattern!r}")
        time.sleep(0.1)


def test_a_node_lost_mid_epoch_and_started_again_the_run_finishes_with_every_step_once(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = fault_args(tiny_data, run, **{"train.epochs": EPOCHS, "data.workers": 2})
    port = free_port()
    first = agent(port, True, args)
    second = agent(port, False, args)
    wait_progress_after(first, rf"^bfly: {TEST_MODEL}, .* 2 process\(es\)", STEPS + 2)  # mid-epoch 2, last.pt at step 6
    second.kill_all()  # agent, trainer and loader workers: SIGKILL, all at once
    lost_at = time.monotonic() - first.t0
    wait_progress_after(first, rf"^bfly: {TEST_MODEL}, .* 1 process\(es\)", 2)  # going on alone
    back = agent(port, False, args)
    back_at = time.monotonic() - first.t0
    assert first.wait() == 0, first.output[-4000:]
    assert back.wait() == 0, back.output[-4000:]
    sizes = world_sizes([first, second, back], first.t0)
    assert [w for _, w in sizes][:2] == [2, 1] and sizes[-1][1] == 2, sizes
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(EPOCHS))  # each epoch once
    assert records[-1]["step"] == EPOCHS * STEPS  # the schedule's final step
    assert "done: best valid top1" in first.output + back.output
    print(
        f"world sizes (s since start: size): {', '.join(f'{t:.0f}s: {w}' for t, w in sizes)}; "
        f"node lost at {lost_at:.0f}s, back at {back_at:.0f}s"
    )
