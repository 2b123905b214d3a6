"""The suite holds wherever a user clones the project: in a folder named `bfly` (the natural name, which
puts `/bfly/` in every path of its .venv) and under a path with spaces (users' home folders have them).

Tests that look for "a traceback from our code" match frames of the packages' own directories
(`conftest.our_frames`), never a path that merely contains `bfly`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bfly.job.train

from conftest import REPO, our_frames

TORCHRUN_FRAME = (
    '  File "/home/ann/my projects/bfly/.venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/'
    'server/api.py", line 921, in _invoke_run\n'
)


def test_a_frame_of_torch_inside_a_clone_named_bfly_is_not_ours():
    assert our_frames(TORCHRUN_FRAME) == []
    assert our_frames('  File "/srv/bfly/bfly_extras/train.py", line 3, in main\n') == []


def test_a_frame_of_our_package_is_ours_however_it_was_imported():
    train_py = Path(bfly.job.train.__file__)
    ours = f'Traceback (most recent call last):\n  File "{train_py}", line 3, in main\n'
    assert our_frames(ours + TORCHRUN_FRAME) == [str(train_py)]
    assert our_frames(f'  File "{train_py.resolve()}", line 3, in main\n') == [str(train_py.resolve())]


def _copy_checkout(dst: Path) -> None:
    """The working tree's files as a clone has them (tracked and new files, nothing git ignores)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():  # a file deleted in the working tree but still in the index is skipped
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout to clone")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals and /proc")
@pytest.mark.slow
def test_the_traceback_checks_pass_in_a_clone_named_bfly_under_a_path_with_spaces(tmp_path):
    clone = tmp_path / "my projects" / "bfly"
    _copy_checkout(clone)
    # The clone's own .venv, as .ci/setup makes it: torch's frames then lie under ".../my projects/bfly/.venv".
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    test = "tests/test_preemption.py::test_sigterm_to_the_whole_process_group_of_a_ddp_job_with_loader_workers"
    proc = subprocess.run(
        [
            str(clone / ".venv/bin/python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "t"),
            test,
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
