"""bfly.tools.child: how the GPU check and the tests start commands. From the repository root, output
captured, a time limit, every process the command started ended with it, and what outlived it named."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bfly.tools.child import REPO, Child, run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# Prints its working directory, leaves a grandchild (same process group) sleeping, and exits.
ORPHAN = """
import os, subprocess, sys
print(os.getcwd(), flush=True)
kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"grandchild {kid.pid}", flush=True)
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_command_runs_from_the_repository_root_and_what_outlived_it_is_named_and_ended(tmp_path):
    with Child([sys.executable, "-c", ORPHAN], log=tmp_path / "out.log") as child:
        grandchild = int(child.wait_for(r"^grandchild (\d+)", timeout=30)[1])
        assert child.wait(30) == 0
        left = child.end()
    assert child.lines[0][1] == str(REPO)
    assert left == [grandchild]
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    assert (tmp_path / "out.log").read_text().startswith(str(REPO))


def test_a_wait_past_its_time_kills_the_command_and_names_the_log(tmp_path):
    with Child([sys.executable, "-c", "import time; time.sleep(300)"], log=tmp_path / "out.log") as child:
        with pytest.raises(TimeoutError, match=rf"still running after 1s, killed; see {tmp_path / 'out.log'}"):
            child.wait(1)
        assert child.proc.poll() is not None


def test_a_command_that_exits_before_the_line_awaited_says_so():
    with Child([sys.executable, "-c", "print('nothing'); raise SystemExit(3)"]) as child:
        with pytest.raises(RuntimeError, match=r"exited with code 3 before a line matching 'step'"):
            child.wait_for("step", timeout=30)


def test_run_keeps_stdout_and_stderr_apart_and_ends_the_group_past_its_time():
    done = run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"], timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", ORPHAN.replace("print(f", "import time; time.sleep(300); print(f")], timeout=2)
