"""Per-rank health: each rank's step time split into data wait, compute and all-reduce wait, gathered at
log points; rank 0 names a rank that holds the others up, and nobody when the ranks are even.

The slow rank is made by the test hook BFLY_TEST_SLOW_RANK=<rank>:<seconds> (bfly.env): that rank waits
longer for each batch, as one on a slow disk would. Real torchrun, gloo, loader workers.
"""

import re
import sys

import pytest
import torch
from torch import nn

from bfly.core.env import DistEnv
from bfly.run.health import FIELDS, STRAGGLER_POINTS, RankHealth

from conftest import read_jsonl
from probes.fault_launch import Launch, fault_args, torchrun_cmd

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")

STRAGGLER = re.compile(r"warning: rank (\d+) \((\S+)\) is a straggler: ([\d.]+)x the other ranks' own work per step")


@pytest.mark.slow
def test_a_rank_slowed_in_its_loader_is_named_within_a_few_log_points(tiny_data, tmp_path):
    run = tmp_path / "run"
    # The delay dwarfs a step on a busy 2-core machine (~1-2.5 s here), so the ratio is clear whatever the load.
    args = fault_args(tiny_data, run, **{"data.workers": 2, "run.stop_after_steps": 7})
    launch = Launch(torchrun_cmd(2, args), timeout=400, env={"BFLY_TEST_SLOW_RANK": "1:2.5"})
    assert launch.wait() == 0, launch.output[-4000:]
    warning = STRAGGLER.search(launch.output)
    assert warning, launch.output[-4000:]
    assert warning[1] == "1" and float(warning[3]) > 1.3
    before = launch.output[: launch.output.index(warning[0])]
    named_at = max(int(s) for s in re.findall(r"^epoch 1/2 step (\d+)/", before, re.M))
    assert named_at <= STRAGGLER_POINTS + 2, f"named only after step {named_at}"
    # The progress lines after it carry the name; train.log keeps the warning.
    assert re.search(
        rf"^epoch 1/2 step \d+/\d+ .* slow rank 1 \({re.escape(warning[2])}\) [\d.]+x$", launch.output, re.M
    )
    assert warning[0] in (run / "train.log").read_text()
    line = next(x for x in launch.output.splitlines() if warning[0] in x)
    print(f"named at step {named_at}: {line}\n{launch.output.splitlines()[-3]}")


@pytest.mark.slow
def test_an_even_job_names_nobody_and_keeps_per_rank_figures(ref2):
    """The 2-process reference run of the fault tests: two equal ranks."""
    assert "straggler" not in (ref2 / "train.log").read_text()
    for record in read_jsonl(ref2 / "metrics.jsonl"):
        health = record["health"]
        assert health["straggler"] is None
        assert len(health["hosts"]) == 2
        for key in FIELDS:
            assert len(health[key]) == 2 and all(v >= 0 for v in health[key]), key
        step, data, comm, compute = (torch.tensor(health[k]) for k in ("step_ms", "data_ms", "comm_ms", "compute_ms"))
        assert torch.allclose(data + comm + compute, step, rtol=1e-3)
        assert all(v > 0.01 for v in health["mem_gb"])  # the trainer's peak resident memory


def rule(points: list[list[float]]) -> list[tuple[int, float] | None]:
    """The straggler named after each log point, given each rank's own work per step at that point."""
    health = RankHealth(
        nn.Linear(2, 2),
        DistEnv(0, 0, len(points[0]), len(points[0]), "torchrun", "env://"),
        torch.device("cpu"),
        ["a", "b", "c"][: len(points[0])],
    )
    named = []
    for own in points:
        health.latest = torch.tensor([[w, 0.0, 0.0, w, 1.0] for w in own], dtype=torch.float64)
        health._update_straggler()
        named.append(health.straggler and health.straggler[0])
    return named


def test_the_straggler_rule():
    even = [[100.0, 104.0, 98.0]] * 6
    assert rule(even) == [None] * 6
    # Over 1.3x the others' median at 3 log points in a row: named at the third; gone once it keeps up.
    slow = [[100.0, 150.0, 100.0]] * 3 + [[100.0, 101.0, 100.0]] * 3
    assert rule(slow) == [None, None, 1, 1, 1, None]
    # A spike at one or two log points is not a straggler.
    assert rule([[100.0, 200.0, 100.0], [100.0, 100.0, 100.0], [300.0, 100.0, 100.0], [100.0] * 3]) == [None] * 4
