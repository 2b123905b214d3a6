"""A disk that fills up while a run trains, on a real file system (a tmpfs in a private mount namespace).

    unshare --mount --propagation private python tests/probes/full_disk.py WORKDIR OVERRIDES...

Trains on WORKDIR/disk (an 800 MiB tmpfs); once last.pt of step 2 is on disk the run is paused
(SIGSTOP to its process group), the file system is filled but for half a checkpoint, and the run continues: its
next checkpoint cannot be written. Then the filler is removed and the run resumed. Prints one JSON
object; copies the final last.pt and metrics.jsonl to WORKDIR/out (the tmpfs goes with the namespace).
Prints "mount failed" and exits 0 where mounting is not allowed.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

PYTHON = sys.executable


def run_until(cmd: list[str], on_line) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        on_line(proc, line)
    return proc.wait(), "".join(lines)


def main() -> None:
    work, overrides = Path(sys.argv[1]), sys.argv[2:]
    disk = work / "disk"
    disk.mkdir(parents=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=800m", "tmpfs", str(disk)], check=True, capture_output=True, text=True
        )
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"mount failed: {getattr(e, 'stderr', '') or e}")
        return
    run = disk / "run"
    cmd = [PYTHON, "-m", "bfly.train", *overrides, f"run.dir={run}"]
    filled = {}

    def fill_after_step_2(proc: subprocess.Popen, line: str) -> None:
        if filled or not line.startswith("epoch 1/2 step 2/"):
            return
        deadline = time.monotonic() + 60
        while not ((run / "last.pt").exists() and not (run / ".last.pt.tmp").exists()):
            assert time.monotonic() < deadline, "no checkpoint at step 2"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGSTOP)
        # Room for the logs but not for the next last.pt: half of this one's size is left free.
        fill = shutil.disk_usage(disk).free - (run / "last.pt").stat().st_size // 2
        with open(disk / "filler", "wb") as f:
            f.truncate(0)
            for _ in range(fill // 2**20):
                f.write(b"\0" * 2**20)
            f.write(b"\0" * (fill % 2**20))
        filled["step"] = torch.load(run / "last.pt", weights_only=True)["global_step"]
        filled["free_mib"] = shutil.disk_usage(disk).free / 2**20
        os.killpg(proc.pid, signal.SIGCONT)

    t0 = time.monotonic()
    rc, out = run_until(cmd, fill_after_step_2)
    seconds = time.monotonic() - t0
    leftovers = sorted(p.name for p in run.iterdir())
    intact_step = torch.load(run / "last.pt", weights_only=True)["global_step"]
    (disk / "filler").unlink()
    rc2, out2 = run_until(cmd, lambda proc, line: None)
    (work / "out").mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        shutil.copy(run / name, work / "out" / name)
    print(
        json.dumps(
            {
                "rc": rc,
                "output": out,
                "seconds": seconds,
                "filled": filled,
                "files": leftovers,
                "intact_step": intact_step,
                "resume_rc": rc2,
                "resume_output": out2,
            }
        )
    )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
