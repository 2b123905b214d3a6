"""train.profile_steps=START:END: a torch.profiler trace of those steps on rank 0, and a top-ops table
printed once; nothing at all when off (the default)."""

import json

from bfly.job.train import main

from conftest import tiny_overrides


def test_a_profile_of_three_steps_on_cpu_writes_a_trace_that_parses(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    small = {"train.epochs": 1, "train.batch_size": 4, "run.stop_after_steps": 5}  # 5 steps of 15, no evaluation
    assert main(tiny_overrides(tiny_data, run, **small, **{"train.profile_steps": "1:4"})) == 0
    out = capsys.readouterr().out
    trace = json.loads((run / "profile" / "trace-rank0.json").read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#0", "ProfilerStep#1", "ProfilerStep#2"]  # global steps 2, 3 and 4
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::convolution_backward", "Optimizer.step#SGD.step"} <= names
    table = (run / "profile" / "top_ops.txt").read_text()
    assert "Self CPU" in table.splitlines()[1] and "aten::" in table
    # Printed once, between the progress lines of steps 4 and 5, and in train.log.
    assert out.count("top ops by time") == 1
    assert out.index("step 4/15") < out.index(f"profile of steps 2..4 in {run / 'profile'}") < out.index("step 5/15")
    assert (run / "train.log").read_text().count("top ops by time") == 1
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["top_ops.txt", "trace-rank0.json"]  # no CUDA


def test_profiling_is_off_by_default(trained_run):
    assert not (trained_run / "profile").exists()
