"""The GPU check (python -m bfly.gpu_check): the one command a lent GPU runs.

On the CPU: the plan and its time budget as the command computes them, the harness (rows printed
per cell, JSON rewritten after every cell, a failing cell's traceback on stderr while the next cell
runs, over-budget cells skipped), the verdict, and the real command with --device cpu --smoke, which
runs the trainer under torchrun, stops it with SIGTERM to the process group and resumes it, with
wandb and submitit made unimportable as on the GPU machine. On a GPU (`-m gpu`): the same at tiny
size with CUDA, inductor and bf16.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bfly import gpu_check
from bfly.cells import Cell, Outcome, run_cells
from bfly.throughput import Row

from conftest import REPO, subprocess_env

H200_CELLS_IN_DEFAULT_BUDGET = ["trainer", "fp16", "resnet50-compiled", "accuracy", "resnet50-eager"]


def plan_of(out: str) -> dict[str, str]:
    """cell key -> its plan line, from the printed plan."""
    lines = [ln.split(".", 1)[1].strip() for ln in out.splitlines() if ln.startswith("  ") and ". " in ln[:6]]
    return {ln.split()[0]: ln for ln in lines}


def test_the_plan_fits_the_issue_cells_into_the_default_budget(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out"), "--plan"]) == 0
    out = capsys.readouterr().out
    plan = plan_of(out)
    assert list(plan) == gpu_check.ORDER
    fits = [k for k, line in plan.items() if "past the budget" not in line]
    assert fits == H200_CELLS_IN_DEFAULT_BUDGET  # the trainer first, compiled ResNet50 before the accuracy run
    assert sum(gpu_check.ESTIMATES[k][0] for k in fits) <= 540  # 9 minutes on one H200
    assert "budget 540s" in out and f"total ~{sum(e for e, _ in gpu_check.ESTIMATES.values())}s" in out
    assert not (tmp_path / "out").exists()  # --plan runs nothing


def test_a_smaller_budget_or_a_cell_list_changes_the_plan(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--plan", "--budget-s", "200", "--cells", "accuracy,trainer"]) == 0
    plan = plan_of(capsys.readouterr().out)
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

    def first() -> list[Row]:
        return [Row("model", "first cell's row", img_s=123.0)]

    def broken() -> list[Row]:
        seen_by_later_cells.append(json.loads(path.read_text()))  # written after the first cell ended
        raise RuntimeError("CUDA error: out of memory")

    def third() -> list[Row]:
        seen_by_later_cells.append(json.loads(path.read_text()))
        return [Row("model", "third cell's row", img_s=7.0)]

    cells = [
        Cell("first", "first", 0, first),
        Cell("broken", "broken", 0, broken),
        Cell("third", "third", 0, third),
        Cell("too-long", "too long", 10_000, lambda: pytest.fail("over budget, must not run")),
    ]
    outcomes = run_cells(cells, 60, path, lambda outs: {"header": len(outs)})
    printed = capsys.readouterr()
    assert [o.status for o in outcomes] == ["ok", "failed", "ok", "skipped"]
    after_first, after_broken = seen_by_later_cells
    assert [c["status"] for c in after_first["cells"]] == ["ok", "pending", "pending", "pending"]
    assert after_first["cells"][0]["rows"][0]["img_s"] == 123.0 and after_first["finished"] is False
    assert after_broken["cells"][1]["error"] == "RuntimeError: CUDA error: out of memory"
    final = json.loads(path.read_text())
    assert final["finished"] is True and final["header"] == 4
    assert final["cells"][2]["rows"][0]["case"] == "third cell's row"
    assert "estimated > budget 60s" in final["cells"][3]["error"]
    # Each cell's rows are printed when it ends, the failure's traceback goes to stderr.
    assert printed.out.index("first cell's row") < printed.out.index("== third") < printed.out.index("third cell's row")
    assert "Traceback (most recent call last)" in printed.err and "CUDA error: out of memory" in printed.err
    assert "Traceback" not in printed.out and "skipped (" in printed.out


def outcome(key: str, status: str = "ok", rows: list[Row] | None = None, error: str = "") -> Outcome:
    return Outcome(key, key, 1, status, 1.0, error, rows or [])


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
    assert got["resnet50 test top-1 >= 97.0%"] == ("97.12%", "PASS")
    assert got["resnet50 training <= 240 s"] == ("250", "FAIL")
    assert got["resnet50-eager ours/torchvision >= 1.00"][1] == "MISSING"  # skipped: not a failure
    broken_e2e = speed_rows(1.2, 1.0, 7000)
    broken_e2e[2] = Row("e2e", "resnet50 (ours), real data via cached", note="FAILED: RuntimeError: CUDA error")
    checks = gpu_check.verdict([outcome("resnet50-eager", rows=broken_e2e)], 224)
    got = {c.target: (c.measured, c.verdict) for c in checks}
    assert got["resnet50-eager ours/torchvision >= 1.00"] == ("1.20", "PASS")
    assert got["resnet50-eager end-to-end/synthetic >= 0.95"] == ("FAILED: RuntimeError: CUDA error", "FAIL")
    assert got["vgg19_bn-compiled end-to-end/synthetic >= 0.95"] == ("not planned", "MISSING")


# --- the real command, on the CPU --------------------------------------------------------------------


def blocked_modules(tmp_path: Path) -> Path:
    """A PYTHONPATH entry under which `import wandb` / `import submitit` fail, as on the GPU machine."""
    root = tmp_path / "blocked"
    for name in ("wandb", "submitit"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return root


def run_smoke(tmp_path: Path, cells: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict, float]:
    out = tmp_path / "out"
    env = subprocess_env(PYTHONPATH=f"{blocked_modules(tmp_path)}:{REPO}")
    env.pop("WANDB_MODE")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bfly.gpu_check", str(out), "--device", "cpu", "--smoke", "--cells", ",".join(cells)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    took = time.monotonic() - start
    return proc, json.loads((out / "gpu_check.json").read_text()), took


def check_smoke(proc: subprocess.CompletedProcess, result: dict, cells: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(c["key"], c["status"]) for c in result["cells"]] == [(k, "ok") for k in cells]
    assert result["finished"] is True and result["smoke"] is True
    out = proc.stdout
    assert "bfly.gpu_check plan" in out and "verdict (smoke run" in out
    trainer = next(c for c in result["cells"] if c["key"] == "trainer")["rows"][0]
    step, steps = trainer["extra"]["stopped_step"], trainer["extra"]["steps_per_epoch"]
    assert 0 < step < steps == 37  # 300 mini images, batch 8: stopped mid-epoch
    assert "stopped by SIGTERM: checkpoint at epoch 1 step" in out
    assert "resumed from " in out and f": epoch 1, step {step} of the epoch" in out
    verdict = {c["target"]: c["verdict"] for c in result["verdict"]}
    assert verdict["trainer: SIGTERM mid-epoch, resumed at that step, finished"] == "PASS"
    assert "wandb is not installed" not in out  # wandb.mode=disabled: never even tried


CI_CELLS = ["trainer", "fp16", "resnet50-compiled", "accuracy"]


def test_cpu_smoke_runs_the_trainer_signal_resume_fp16_speed_and_accuracy_cells(tmp_path):
    proc, result, took = run_smoke(tmp_path, CI_CELLS, timeout=240)
    check_smoke(proc, result, CI_CELLS)
    for key in ("resnet50-compiled", "accuracy"):
        assert next(c for c in result["cells"] if c["key"] == key)["rows"], key
    print(f"CPU smoke of {CI_CELLS}: {took:.0f}s")


@pytest.mark.slow
def test_cpu_smoke_runs_every_cell(tmp_path):
    proc, result, took = run_smoke(tmp_path, gpu_check.ORDER, timeout=600)
    check_smoke(proc, result, gpu_check.ORDER)
    print(f"CPU smoke of every cell: {took:.0f}s")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_runs_every_cell_with_inductor_and_bf16(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bfly.gpu_check", str(out), "--smoke", "--budget-s", "900"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    result = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(c["status"] == "ok" for c in result["cells"]), [(c["key"], c["error"]) for c in result["cells"]]
    assert "compiled(" not in proc.stdout  # inductor, not the CPU smoke's eager backend
