"""The GPU check (python -m bfly.gpu_check): a GPU node's acceptance run, in at most 9 minutes.

On the CPU: the plan and its time budget as the command computes them, the harness (rows printed
per cell, JSON rewritten after every cell, a failing cell's traceback on stderr while the next cell
runs, over-budget cells skipped), the hard budget (cells that run past their estimate are stopped at
the time left, in this process, in a child process or stuck in a C call; partial rows kept; the
verdict and JSON written on SIGTERM too), the verdict, and the real command with --device cpu
--smoke, which runs the trainer under torchrun, stops it with SIGTERM to the process group and
resumes it, with wandb and submitit made unimportable (a GPU node may have neither). On a GPU
(`-m gpu`): the same at tiny size with CUDA, inductor and bf16, in two parts of under 10 minutes.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bfly.tools import cells, gpu_check
from bfly.tools.cells import Cell, CellOutcome, run_cells
from bfly.tools.throughput import Row

from conftest import REPO, run_python, subprocess_env

# 540 s from the process's start, 10 s of it kept for the verdict: the fifth planned cell (resnet50-eager)
# runs only if the first four finish early.
H200_CELLS_IN_DEFAULT_BUDGET = ["trainer", "fp16", "resnet50-compiled", "accuracy"]


def plan_of(out: str) -> dict[str, str]:
    """cell key -> its plan line, from the printed plan."""
    lines = [ln.split(".", 1)[1].strip() for ln in out.splitlines() if ln.startswith("  ") and ". " in ln[:6]]
    lines = [ln for ln in lines if ln.split()[0] in gpu_check.TITLES]
    return {ln.split()[0]: ln for ln in lines}


def plan_command(*args: str) -> str:
    """The printed plan of `python -m bfly.gpu_check`, whose start-up counts against the budget."""
    proc = run_python("-m", "bfly.gpu_check", *args, "--plan", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_plan_fits_the_first_cells_into_the_default_budget(tmp_path):
    out = plan_command(str(tmp_path / "out"))
    plan = plan_of(out)
    assert list(plan) == gpu_check.ORDER
    startup = float(re.search(r"start-up +(\d+)s so far \(counted\)", out)[1])
    fits = [k for k, line in plan.items() if "past the budget" not in line]
    ends = itertools.accumulate(gpu_check.ESTIMATES[k][0] for k in gpu_check.ORDER)
    assert fits == [k for k, end in zip(gpu_check.ORDER, ends) if startup + end <= 540 - 10]  # the start-up counts
    # With a start-up of up to 20 s, the trainer comes first and compiled ResNet50 before the accuracy run.
    assert sum(gpu_check.ESTIMATES[k][0] for k in H200_CELLS_IN_DEFAULT_BUDGET) <= 540 - 10 - 20
    assert list(gpu_check.ESTIMATES)[:4] == H200_CELLS_IN_DEFAULT_BUDGET
    assert "budget 540s" in out and "(10s kept for the verdict)" in out
    assert not (tmp_path / "out").exists()  # --plan runs nothing


def test_a_smaller_budget_or_a_cell_list_changes_the_plan(tmp_path):
    plan = plan_of(plan_command(str(tmp_path), "--budget-s", "220", "--cells", "accuracy,trainer"))
    assert list(plan) == ["accuracy", "trainer"]
    assert "past the budget" not in plan["accuracy"] and "past the budget" in plan["trainer"]


def test_an_unknown_cell_is_a_usage_error(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--cells", "trainer,resnet51"]) == 2
    assert "unknown cell(s) ['resnet51']" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without a GPU")
def test_without_a_gpu_the_command_says_how_to_check_the_plumbing(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path)]) == 2
    assert "no CUDA device here; `--device cpu --smoke`" in capsys.readouterr().err


def test_a_wrong_data_folder_fails_before_any_cell(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out"), "--device", "cpu", "--smoke", "--data", str(tmp_path)]) == 2
    assert "bfly.gpu_check: error:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_cells_print_as_they_end_rewrite_the_json_and_survive_a_failing_cell(tmp_path, capsys):
    path = tmp_path / "gpu_check.json"
    seen_by_later_cells = []

    def first(run) -> list[Row]:
        return [Row("model", "first cell's row", img_s=123.0)]

    def broken(run) -> list[Row]:
        seen_by_later_cells.append(json.loads(path.read_text()))  # written after the first cell ended
        raise RuntimeError("CUDA error: out of memory")

    def third(run) -> list[Row]:
        seen_by_later_cells.append(json.loads(path.read_text()))
        return [Row("model", "third cell's row", img_s=7.0)]

    cells = [
        Cell("first", "first", 0, first),
        Cell("broken", "broken", 0, broken),
        Cell("third", "third", 0, third),
        Cell("too-long", "too long", 10_000, lambda run: pytest.fail("over budget, must not run")),
    ]
    outcomes = run_cells(cells, 60, path, lambda outs: {"header": len(outs)}, started=time.monotonic())
    printed = capsys.readouterr()
    assert [o.status for o in outcomes] == ["ok", "failed", "ok", "skipped"]
    after_first, after_broken = seen_by_later_cells
    assert [c["status"] for c in after_first["cells"]] == ["ok", "running", "pending", "pending"]
    assert after_first["cells"][0]["rows"][0]["img_s"] == 123.0 and after_first["finished"] is False
    assert after_broken["cells"][1]["error"] == "RuntimeError: CUDA error: out of memory"
    final = json.loads(path.read_text())
    assert final["finished"] is True and final["header"] == 4
    assert final["cells"][2]["rows"][0]["case"] == "third cell's row"
    assert "estimated > budget 60s less 10s for the verdict" in final["cells"][3]["error"]
    # Each cell's rows are printed when it ends, the failure's traceback goes to stderr.
    assert printed.out.index("first cell's row") < printed.out.index("== third") < printed.out.index("third cell's row")
    assert "Traceback (most recent call last)" in printed.err and "CUDA error: out of memory" in printed.err
    assert "Traceback" not in printed.out and "skipped (" in printed.out


# --- the hard budget: cells that run past their estimate ------------------------------------------------


def test_a_cell_that_overruns_is_stopped_at_the_time_left_and_the_verdict_is_still_written(tmp_path, capsys):
    path = tmp_path / "gpu_check.json"
    finished = []

    def slow(run) -> list[Row]:
        run.partial([Row("acc", "after epoch 1", note="partial")])  # kept if the cell is cut short
        time.sleep(60)  # estimated 1 s
        return [Row("acc", "never")]

    cells = [
        Cell("slow", "slow", 1, slow, max_s=2),
        Cell("next", "next", 0, lambda run: [Row("model", "next cell")]),
        Cell("late", "late", 3, lambda run: pytest.fail("no time left for it")),
    ]
    start = time.monotonic()
    # 10 s of the 16 s budget are kept for the verdict, 2 s went to "start-up": 4 s for the cells. The
    # slow cell may take 2 s at most, the next one runs, the last one's 3 s do not fit in what is left.
    outcomes = run_cells(cells, 16, path, lambda o: {}, finished.append, started=start - 2)
    took = time.monotonic() - start
    assert [o.status for o in outcomes] == ["timeout", "ok", "skipped"]
    assert 1.5 < outcomes[0].seconds < 3.5 and took < 16 - 2
    assert outcomes[0].limit_s == 2
    assert outcomes[0].rows[0].case == "after epoch 1" and "partial rows kept" in outcomes[0].error
    assert finished == [outcomes]  # the verdict: once
    final = json.loads(path.read_text())
    assert final["finished"] is True and final["cells"][0]["rows"][0]["note"] == "partial"


def test_a_child_process_that_overruns_is_killed_at_the_cells_deadline(tmp_path):
    ctx = gpu_check.Context(tmp_path, tmp_path, tmp_path, "", torch.device("cpu"), True)
    pids = []

    def child_cell(run) -> list[Row]:
        with gpu_check.Child(["sleep", "300"], tmp_path / "child.log", ctx) as child:
            pids.append(child.proc.pid)
            child.wait(run.left())
        return []

    (out,) = run_cells(
        [Cell("child", "child", 1, child_cell)], 13, tmp_path / "j.json", lambda o: {}, started=time.monotonic()
    )
    assert out.status == "timeout" and out.seconds < 6
    assert not running(pids[0])
    assert ctx.children == set()


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child of an ended process may wait a moment for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


STUCK = """
import signal, subprocess, sys, time
from pathlib import Path
from bfly.tools.cells import Cell, run_cells
from bfly.tools.throughput import Row

out = Path(sys.argv[1])
children = []

def stuck(run):
    children.append(subprocess.Popen(["sleep", "300"]))
    (out / "child.pid").write_text(str(children[0].pid))
    run.partial([Row("acc", "measured before it got stuck")])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # like a call stuck in C: the alarm never lands
    time.sleep(300)

def ended(outcomes):
    print("VERDICT", [o.status for o in outcomes], flush=True)

run_cells([Cell("stuck", "stuck", 1, stuck), Cell("after", "after", 0, lambda run: [])], 12, out / "gpu_check.json",
          lambda o: {}, ended, lambda: [c.kill() for c in children], started=time.monotonic())
"""


@pytest.mark.slow
def test_a_cell_stuck_outside_python_is_ended_by_its_guard_with_json_and_verdict(tmp_path):
    start = time.monotonic()
    proc = run_python("-c", STUCK, str(tmp_path), timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 1 and took < 2 + cells.GRACE_S + 30, proc.stderr  # + start-up on a busy machine
    assert "VERDICT ['timeout', 'pending']" in proc.stdout
    assert "did not stop at its time limit; ending the check" in proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["finished"] is True and result["cells"][0]["rows"][0]["case"] == "measured before it got stuck"
    assert not running(int((tmp_path / "child.pid").read_text()))  # the cell's child process was ended too


SIGTERMED = """
import sys, time
from pathlib import Path
from bfly.tools import cells
from bfly.tools import gpu_check
from bfly.tools.cells import Cell, run_cells
import signal
signal.signal(signal.SIGTERM, gpu_check.stop_on_sigterm)
out = Path(sys.argv[1])
def slow(run):
    (out / "running").touch()
    time.sleep(60)
run_cells([Cell("slow", "slow", 5, slow)], 100, out / "gpu_check.json", lambda o: {},
          lambda outcomes: print("VERDICT", [o.status for o in outcomes], flush=True), started=time.monotonic())
"""


def test_sigterm_during_a_cell_still_writes_the_json_and_the_verdict(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERMED, str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "running").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "VERDICT ['stopped']" in stdout and "stopped by SIGTERM" in stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["finished"] is True and result["cells"][0]["status"] == "stopped"


def outcome(key: str, status: str = "ok", rows: list[Row] | None = None, error: str = "") -> CellOutcome:
    return CellOutcome(key, key, 1, status, 1.0, error, rows or [])


def speed_rows(ratio: float, e2e: float, img_s: float) -> list[Row]:
    return [
        Row("model", "resnet50 (ours), synthetic", img_s=img_s / e2e, ratio=ratio, ratio_of="torchvision"),
        Row("model", "resnet50 (torchvision), synthetic", img_s=img_s / e2e / ratio),
        Row("e2e", "resnet50 (ours), real data via cached", img_s=img_s, ratio=e2e, ratio_of="synthetic"),
    ]


def test_the_verdict_holds_each_figure_against_its_target():
    outcomes = [
        outcome("trainer"),
        outcome("fp16", "failed", error="RuntimeError: fp16: losses [nan]"),
        outcome("resnet50-compiled", rows=speed_rows(1.01, 0.94, 6600)),
        outcome(
            "accuracy",
            rows=[Row("acc", "resnet50 recipe (configs/resnet50.yaml)", extra={"test_top1": 0.9712, "train_s": 250.0})],
        ),
        outcome("resnet50-eager", "skipped", error="500s spent + ~35s estimated > budget 540s"),
    ]
    got = {c.target: (c.measured, c.verdict) for c in gpu_check.verdict(outcomes, 224)}
    assert got["trainer: SIGTERM mid-epoch, resumed at that step, finished"] == ("ok", "PASS")
    assert got["trainer: fp16 + GradScaler, finite loss"] == ("cell failed: RuntimeError: fp16: losses [nan]", "FAIL")
    assert got["resnet50-compiled ours/torchvision >= 1.00"] == ("1.01", "PASS")
    assert got["resnet50-compiled end-to-end/synthetic >= 0.95"] == ("0.94", "FAIL")
    assert got["resnet50 compiled end to end >= 6,500 img/s at 224 px"] == ("6,600", "PASS")
    assert got["resnet50 test top-1 >= 95.0%"] == ("97.12%", "PASS")
    assert got["resnet50 training <= 240 s"] == ("250", "FAIL")
    assert got["resnet50-eager ours/torchvision >= 1.00"][1] == "MISSING"  # skipped: not a failure
    broken_e2e = speed_rows(1.2, 1.0, 7000)
    broken_e2e[2] = Row("e2e", "resnet50 (ours), real data via cached", note="FAILED: RuntimeError: CUDA error")
    checks = gpu_check.verdict([outcome("resnet50-eager", rows=broken_e2e)], 224)
    got = {c.target: (c.measured, c.verdict) for c in checks}
    assert got["resnet50-eager ours/torchvision >= 1.00"] == ("1.20", "PASS")
    assert got["resnet50-eager end-to-end/synthetic >= 0.95"] == ("FAILED: RuntimeError: CUDA error", "FAIL")
    assert got["vgg19_bn-compiled end-to-end/synthetic >= 0.95"] == ("not planned", "MISSING")
    assert got["syncbn-compiled SyncBatchNorm2d/BatchNorm2d >= 0.90"] == ("not planned", "MISSING")
    sync = [
        Row("model", "resnet50 (ours, BatchNorm2d), synthetic", img_s=1000.0),
        Row("model", "resnet50 (ours, SyncBatchNorm2d), synthetic", img_s=850.0, ratio=0.85, ratio_of="BatchNorm2d"),
    ]
    got = {c.target: (c.measured, c.verdict) for c in gpu_check.verdict([outcome("syncbn-compiled", rows=sync)], 224)}
    assert got["syncbn-compiled SyncBatchNorm2d/BatchNorm2d >= 0.90"] == ("0.85", "FAIL")


# --- the real command, on the CPU --------------------------------------------------------------------


def blocked_modules(tmp_path: Path) -> Path:
    """A PYTHONPATH entry under which `import wandb` / `import submitit` fail, as on a GPU node without them."""
    root = tmp_path / "blocked"
    for name in ("wandb", "submitit"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this node')\n")
    return root


def run_smoke(tmp_path: Path, cells: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict, float]:
    out = tmp_path / "out"
    env = subprocess_env(PYTHONPATH=f"{blocked_modules(tmp_path)}:{REPO}")
    env.pop("WANDB_MODE")
    start = time.monotonic()
    proc = run_python(
        *["-m", "bfly.gpu_check", str(out), "--device", "cpu", "--smoke", "--cells", ",".join(cells)],
        *["--budget-s", str(timeout - 30)],  # the hard budget ends it in time, JSON and verdict written
        timeout=timeout,
        env=env,
    )
    took = time.monotonic() - start
    return proc, json.loads((out / "gpu_check.json").read_text()), took


def check_smoke(proc: subprocess.CompletedProcess, result: dict, cells: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(c["key"], c["status"]) for c in result["cells"]] == [(k, "ok") for k in cells]
    assert result["finished"] is True and result["smoke"] is True
    out = proc.stdout
    assert "bfly.gpu_check plan" in out and "verdict (smoke run" in out
    assert "wandb is not installed" not in out  # wandb.mode=disabled: never even tried
    verdict = {c["target"]: c["verdict"] for c in result["verdict"]}
    for key in cells:
        assert next(c for c in result["cells"] if c["key"] == key)["rows"], key
    assert verdict["trainer: fp16 + GradScaler, finite loss"] == ("PASS" if "fp16" in cells else "MISSING")
    if "trainer" in cells:
        trainer = next(c for c in result["cells"] if c["key"] == "trainer")["rows"][0]
        step, steps = trainer["extra"]["stopped_step"], trainer["extra"]["steps_per_epoch"]
        assert 0 < step < steps == 37  # 300 mini images, batch 8: stopped mid-epoch
        assert "stopped by SIGTERM: checkpoint at epoch 1 step" in out
        assert "resumed from " in out and f": epoch 1, step {step} of the epoch" in out
        assert verdict["trainer: SIGTERM mid-epoch, resumed at that step, finished"] == "PASS"


@pytest.mark.slow
def test_cpu_smoke_runs_the_fp16_trainer_cell(tmp_path):
    cells = ["fp16"]
    proc, result, took = run_smoke(tmp_path, cells, timeout=300)
    check_smoke(proc, result, cells)
    print(f"CPU smoke of {cells}: {took:.0f}s")


@pytest.mark.slow
def test_cpu_smoke_runs_the_trainer_signal_resume_fp16_speed_and_accuracy_cells(tmp_path):
    cells = ["trainer", "fp16", "resnet50-compiled", "accuracy"]
    proc, result, took = run_smoke(tmp_path, cells, timeout=420)
    check_smoke(proc, result, cells)
    print(f"CPU smoke of {cells}: {took:.0f}s")


@pytest.mark.slow
def test_cpu_smoke_runs_every_cell(tmp_path):
    proc, result, took = run_smoke(tmp_path, gpu_check.ORDER, timeout=600)
    check_smoke(proc, result, gpu_check.ORDER)
    print(f"CPU smoke of every cell: {took:.0f}s")


# Every cell once on a GPU, in two commands that each fit in 10 minutes (budget 540 s, killed at 570 s).
GPU_SMOKE_PARTS = {
    "trainer-fp16-accuracy": ["trainer", "fp16", "accuracy"],
    "speed": ["resnet50-compiled", "resnet50-eager", "vgg19_bn-eager", "vgg19_bn-compiled", "syncbn-compiled"],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("part", list(GPU_SMOKE_PARTS))
def test_gpu_smoke_runs_every_cell_with_inductor_and_bf16(tmp_path, part):
    keys = GPU_SMOKE_PARTS[part]
    assert sum(gpu_check.ESTIMATES[k][2] for k in keys) <= 540 - 10 - 30  # start-up and the verdict fit too
    out = tmp_path / "out"
    proc = run_python("-m", "bfly.gpu_check", str(out), "--smoke", "--cells", ",".join(keys), timeout=570)
    result = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(c["status"] == "ok" for c in result["cells"]), [(c["key"], c["error"]) for c in result["cells"]]
    assert "compiled(" not in proc.stdout  # inductor, not the CPU smoke's eager backend
    print(part, [(c["key"], c["seconds"]) for c in result["cells"]])
