"""Launching real training processes for the fault-injection tests (tests/test_faults.py and friends).

A `Launch` starts `python -m bfly.train` or `torchrun ... -m bfly.train` the way the GPU check starts
its commands (bfly.tools.child), stdout and stderr merged and read live, so a test can wait for a
training step, find a worker's pid by its RANK, send it a real signal, and bound every wait: on a
timeout every process it started is killed and the test fails with the output's tail. Linux only (/proc).

Reference runs (uninterrupted, same config) are cached per session: every test that compares its
final weights with an uninterrupted run of the same config reuses one.
"""

from __future__ import annotations

import atexit
import csv
import re
import sys
import time
from pathlib import Path
from typing import NoReturn

from bfly.tools.child import Child, children

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
from conftest import PYTHON, subprocess_env, tiny_overrides  # noqa: E402

PROGRESS = re.compile(r"^epoch (\d+)/\d+ step (\d+)/(\d+) ")

# The config of the fault tests: tiny data (60 train images, 32 px), global batch 12: 5 steps per
# epoch, 2 epochs, last.pt every 2 steps and at each epoch's end.
CKPT_EVERY = 2
STEPS = 10
FAULT = {"train.epochs": 2, "train.checkpoint_every_steps": CKPT_EVERY}


def paced(seconds: float) -> dict[str, str]:
    """The environment that makes rank 0 wait `seconds` more for each batch (BFLY_TEST_STALL); every rank waits
    for it. The test model's steps take milliseconds: a signal, kill or stop sent once a step is in the log
    must still find the run mid-epoch, past its first steps, as it would in a real run."""
    return {"BFLY_TEST_STALL": f"0:data:*:{seconds}"}


def fault_args(data: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(data, run_dir, **{**FAULT, **extra})


def train_cmd(args: list[str]) -> list[str]:
    return [PYTHON, "-m", "bfly.train", *args]


# torchrun's agent keeps one TCPStore for all restarts and lets the workers use it (torch >= 2.5):
# restarted workers then read the dead workers' gloo addresses from it and fail or hang in
# init_process_group (pytorch/pytorch#135712; 3 restarts in 5 failed here without this setting).
# The static rendezvous (--master_port) has the same problem and no switch: use --standalone.
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_cmd(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    return [
        "env",
        *[f"{k}={v}" for k, v in RESTARTABLE.items()],
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "bfly.train",
        *args,
    ]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[-1] if ranks else None


class Launch(Child):
    """One launched command (bfly.tools.child.Child: from the repository root, its own process group, its
    merged output collected line by line with arrival times), in the test tier's environment, with one
    deadline for every wait: past it, or when a wait fails, every process it started is killed and the
    test fails with the output's tail. tty=True: on a pseudo-terminal as the foreground job, so `ctrl_c`
    is a real Ctrl-C (the terminal sends SIGINT to the foreground process group)."""

    def __init__(self, cmd: list[str], timeout: float, tty: bool = False, env: dict[str, str] | None = None):
        super().__init__(cmd, subprocess_env(**({"TERM": "xterm"} if tty else {}), **(env or {})), tty=tty)
        self.deadline = self.t0 + timeout
        atexit.register(self.kill_all)  # a test that fails half-way leaves no process behind

    def _left(self, timeout: float | None) -> float:
        end = min(self.deadline, time.monotonic() + timeout) if timeout else self.deadline
        return max(end - time.monotonic(), 0.0)

    def fail(self, why: str) -> NoReturn:
        self.kill_all()
        raise AssertionError(f"{why}\n--- output (tail) ---\n{self.output[-6000:]}")

    def wait_for(self, pattern: str | re.Pattern, timeout: float | None = None) -> re.Match:  # type: ignore[override]
        """The first output line matching `pattern` (regex, searched), waiting for it if needed."""
        try:
            return super().wait_for(pattern, self._left(timeout))
        except (TimeoutError, RuntimeError) as e:
            self.fail(str(e))

    def wait_step(self, global_step: int, timeout: float | None = None) -> int:
        """Waits for rank 0's progress line of `global_step` or a later one; returns the latest step seen."""
        end = time.monotonic() + self._left(timeout)
        while True:
            steps = [progress_step(line) for _, line in self.lines]
            done = [s for s in steps if s is not None and s >= global_step]
            if done:
                return max(s for s in steps if s is not None)
            if self.proc.poll() is not None:
                self.fail(f"exited ({self.proc.returncode}) before step {global_step}")
            if time.monotonic() > end:
                self.fail(f"step {global_step} not reached within the time limit")
            time.sleep(0.02)

    def wait(self, timeout: float | None = None) -> int:  # type: ignore[override]
        try:
            return super().wait(max(self._left(timeout), 0.1))
        except TimeoutError:
            self.fail("did not exit within the time limit (a hang)")

    def workers(self, n: int, timeout: float = 60) -> dict[int, int]:
        """rank -> pid of the current torchrun workers, once all `n` have started."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ranks = {_rank_of(pid): pid for pid in children(self.proc.pid)}
            ranks.pop(None, None)
            if len(ranks) == n:
                return ranks  # type: ignore[return-value]
            time.sleep(0.05)
        self.fail(f"{n} workers not found")

    def kill_all(self) -> None:
        """SIGKILL every process of this launch (bfly.tools.child.end_tree)."""
        self.end()


def progress_step(line: str) -> int | None:
    """Global step of a rank-0 progress line `epoch E/N step S/T ...`."""
    m = PROGRESS.match(line)
    return (int(m[1]) - 1) * int(m[3]) + int(m[2]) if m else None


def run_to_end(cmd: list[str], timeout: float = 300) -> Launch:
    launch = Launch(cmd, timeout)
    rc = launch.wait()
    if rc != 0:
        launch.fail(f"exit code {rc}")
    return launch


_references: dict[tuple, Path] = {}


def reference_run(base: Path, nproc: int, args: list[str]) -> Path:
    """An uninterrupted run of `args` (run.dir excluded) on `nproc` processes, once per session."""
    key = (nproc, *[a for a in args if not a.startswith("run.dir=")])
    if key not in _references:
        run_dir = base / f"reference-{len(_references)}"
        cmd = train_cmd if nproc == 1 else lambda a: torchrun_cmd(nproc, a)
        run_to_end(cmd([*args, f"run.dir={run_dir}"]))
        _references[key] = run_dir
    return _references[key]


# --- editable copies of a dataset --------------------------------------------------------------------


def read_rows(csv_path: Path) -> tuple[list[str], list[list[str]]]:
    with open(csv_path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def write_rows(csv_path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def replace_image(root: Path, split: str, row: int, name: str, content: bytes | None = None) -> Path:
    """Points data row `row` (0-based) of `split` at `root/broken/name`, written with `content`
    (None: the file is not created). Returns the path the trainer will name."""
    header, rows = read_rows(root / f"{split}.csv")
    rows[row][header.index("filepaths")] = f"broken/{name}"
    write_rows(root / f"{split}.csv", header, rows)
    path = root.resolve() / "broken" / name
    if content is not None:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    return path
