"""The CPU tier stays on the CPU on a machine with a GPU, and leaves no global backend flag behind.

Shown on a pretend GPU: a pytest plugin answers torch.cuda's queries as a 1-GPU machine does, and
honours CUDA_VISIBLE_DEVICES as the driver does. A small test file then runs under this repository's
conftest, once as the default tier and once as `-m gpu`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

PRETEND_GPU = """
import os
import torch

def _visible():
    return os.environ.get("CUDA_VISIBLE_DEVICES") != ""

torch.cuda.is_available = _visible
torch.cuda.device_count = lambda: 1 if _visible() else 0
torch.cuda.set_device = lambda device: None
torch.cuda.current_device = lambda: 0
"""

TESTS = """
import subprocess, sys
import pytest
import torch
from bfly.core.config import load_config
from bfly.core.stack import configure_backends, pick_device
from conftest import subprocess_env

def test_in_process_training_picks_the_cpu():
    assert pick_device(0, 1) == torch.device("cpu")

def test_a_child_process_sees_no_gpu():
    child = subprocess.run(
        [sys.executable, "-c", "import pretend_gpu, torch; print(torch.cuda.is_available())"],
        env=subprocess_env(), capture_output=True, text=True, check=True,
    )
    assert child.stdout.strip() == "False"

def test_1_a_gpu_run_switches_global_backend_flags_on():
    configure_backends(load_config(None, ["train.deterministic=true"]), torch.device("cuda", 0))
    torch.backends.cudnn.benchmark = True  # what bfly.bench does
    assert torch.backends.cuda.matmul.allow_tf32 and torch.are_deterministic_algorithms_enabled()

def test_2_the_next_test_starts_from_the_defaults():
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_test_sees_the_gpu():
    assert pick_device(0, 1) == torch.device("cuda", 0)
"""


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pretend_gpu", "-p", "no:cacheprovider", "-q", "-rs", *args],
        cwd=folder,
        env=subprocess_env(PYTHONPATH=f"{folder}:{REPO}", CUDA_VISIBLE_DEVICES="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_on_a_gpu_machine_the_cpu_tier_hides_the_gpu_and_restores_backend_flags(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pretend_gpu.py").write_text(PRETEND_GPU)
    (tmp_path / "test_tier.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n    slow: long\n")
    default = run_pytest(tmp_path, "-m", "not slow")
    assert "4 passed, 1 skipped" in default.stdout, default.stdout[-3000:] + default.stderr[-2000:]
    assert "needs a CUDA GPU" in default.stdout  # the gpu test is hidden from the GPU too: it skips
    gpu = run_pytest(tmp_path, "-m", "gpu")
    assert "1 passed, 4 deselected" in gpu.stdout, gpu.stdout[-3000:] + gpu.stderr[-2000:]
