"""Start-up of bfly.train on run directories that cannot hold its checkpoints, on real file systems.

Run in a private mount namespace (the test starts it under `unshare --mount`): mounts three small
tmpfs (read-only, full, too small for a checkpoint), runs `bfly.job.train.main` on each and prints one
JSON line per case. Prints "mount failed" and exits 0 where mounting is not allowed.
    unshare --mount --propagation private python tests/probes/fault_disk.py WORKDIR OVERRIDES...
"""

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from bfly.job.train import main


def mount(where: Path, options: str) -> None:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True, capture_output=True, text=True
    )


def fill(where: Path) -> None:
    with open(where / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


def main_probe() -> None:
    work, overrides = Path(sys.argv[1]), sys.argv[2:]
    try:
        mount(work / "read-only", "ro,size=1m")
        mount(work / "full", "size=256k")
        mount(work / "too small", "size=8m")
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"mount failed: {getattr(e, 'stderr', '') or e}")
        return
    fill(work / "full")
    run_dirs = {"read-only": work / "read-only" / "run", "full": work / "full", "too small": work / "too small" / "run"}
    for case, run_dir in run_dirs.items():
        out, err = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([*overrides, f"run.dir={run_dir}"])
        print(
            json.dumps(
                {
                    "case": case,
                    "run_dir": str(run_dir),
                    "rc": rc,
                    "stdout": out.getvalue(),
                    "stderr": err.getvalue(),
                    "seconds": time.monotonic() - t0,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main_probe()
