"""Decode a split once: uint8 RGB images at the training size, in a memory-mapped .npy file.

The file name carries a fingerprint of everything that determines its pixels: the image paths in
CSV order, each file's size and modification time, the image size and this format's version. A
changed CSV (rows added, removed or reordered) or a replaced image gives a new fingerprint, so the
cache is rebuilt; labels are not part of it (they are read from the CSV each run).

Images are resized exactly as the PIL eval transform does (Pillow bilinear to size x size), so a
cached eval batch is pixel-identical to the PIL path's. Building is parallel (Pillow releases the
GIL while decoding and resizing) and atomic: a file under its final name is always complete.
Several processes on one node (torchrun ranks) take a file lock: one builds, the others wait and
then map the same file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from bfly.core.data.metadata import DataError, Split
from bfly.core.data.pil_input import open_rgb, small_images_warning, too_small

FORMAT_VERSION = 2  # 2: EXIF orientation applied (open_rgb); caches of version 1 are rebuilt
_CHUNK = 64  # images per task: large enough to amortise scheduling, small enough for a smooth bar


def decode_resized(path: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8, the same pixels as transforms.Resize((size, size)) on the PIL image."""
    return _resized(open_rgb(path), size)


def _resized(image: Image.Image, size: int) -> np.ndarray:
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def fingerprint(split: Split, size: int) -> str:
    h = hashlib.sha256(f"bfly-decode-cache v{FORMAT_VERSION} {size}\n".encode())
    for path in split.paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found (split {split.name!r})") from None
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(split: Split, size: int, cache_dir: Path) -> Path:
    # The slot (dataset folder, split, size) keeps datasets that share a cache_dir apart; the
    # fingerprint tells versions of one slot apart.
    root = os.path.commonpath([os.path.dirname(p) for p in split.paths])
    slot = hashlib.sha256(root.encode()).hexdigest()[:8]
    return cache_dir / f"{split.name}-{size}px-{slot}-{fingerprint(split, size)[:16]}.npy"


def open_cache(split: Split, size: int, cache_dir: str | Path, workers: int = 0, progress: bool = True) -> np.ndarray:
    """The split as a read-only-on-disk (copy-on-write) memmap of shape (N, size, size, 3), uint8.

    Built on first use or when the fingerprint changed; `workers` = 0: a thread per core, up to 32.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data.cache_dir {cache_dir}: cannot create the decode cache folder "
            f"({e.strerror}); set data.cache_dir to a writable folder"
        ) from None
    path = cache_path(split, size, cache_dir)
    with _locked(path.with_name("." + path.name.rsplit("-", 1)[0] + ".lock")):
        if not path.exists():
            build(split, size, path, workers or min(32, available_cores()), progress)
            _remove_stale(path)
    images = np.load(path, mmap_mode="c")
    if images.shape != (len(split.paths), size, size, 3) or images.dtype != np.uint8:
        raise DataError(
            f"{path}: decode cache has shape {images.shape} {images.dtype}, expected "
            f"({len(split.paths)}, {size}, {size}, 3) uint8; delete the file to rebuild it"
        )
    return images


def build(split: Split, size: int, path: Path, workers: int, progress: bool) -> None:
    n = len(split.paths)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    _reserve(tmp)
    report = _progress(f"bfly: decoding split {split.name!r} ({n} images at {size}px) into {path}", n, progress)

    pool = ThreadPoolExecutor(workers)
    small: list[str] = []
    try:
        done = 0
        for count, chunk_small in pool.map(partial(_fill, out, split.paths, size), range(0, n, _CHUNK)):
            done += count
            small += chunk_small
            report(done)
        pool.shutdown()
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        pool.shutdown(cancel_futures=True)  # a bad image stops the build now, not after the rest
        tmp.unlink(missing_ok=True)
        raise
    if small:  # each image is decoded once here: the one place on this path that sees its size
        warnings.warn(f"split {split.name!r}: {small_images_warning(small, size)}", stacklevel=2)


def _fill(out: np.ndarray, paths: Sequence[str], size: int, lo: int) -> tuple[int, list[str]]:
    """Decode the chunk of images that starts at `lo` into `out`; returns how many, and the images among
    them too small for `size` ("path (WxH)")."""
    hi = min(lo + _CHUNK, len(paths))
    small = []
    for i in range(lo, hi):
        image = open_rgb(paths[i])
        if too_small(image.size, size):
            small.append(f"{paths[i]} ({image.size[0]}x{image.size[1]})")
        out[i] = _resized(image, size)
    return hi - lo, small


def _reserve(tmp: Path) -> None:
    """Allocate the file's blocks now: a full disk is then an error here, not a SIGBUS mid-build."""
    nbytes = tmp.stat().st_size
    try:
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{tmp.parent}: cannot write a {nbytes / 2**30:.2f} GB decode cache ({e.strerror}); "
            "free space or set data.cache_dir elsewhere"
        ) from None


def _progress(title: str, total: int, enabled: bool) -> Callable[[int], None]:
    """A one-line bar on a terminal; in a log file, a line at each quarter, so logs stay short."""
    if not enabled:
        return lambda done: None
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    next_mark = [0.25]
    print(title, file=sys.stderr, flush=True)

    def report(done: int) -> None:
        if not tty and done < total and done < next_mark[0] * total:
            return
        while next_mark[0] * total <= done:
            next_mark[0] += 0.25
        dt = time.perf_counter() - start
        line = f"  [{'#' * (30 * done // total):<30}] {done}/{total} {done / max(dt, 1e-9):.0f} img/s {dt:.1f}s"
        end = "\n" if done == total or not tty else ""
        print(("\r" if tty else "") + line, end=end, file=sys.stderr, flush=True)

    return report


@contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(current: Path) -> None:
    """Older versions of this slot, and half-built files left by killed builders on this host."""
    slot = current.name.rsplit("-", 1)[0]
    for old in current.parent.glob(f"{slot}-*.npy"):
        if old != current:
            old.unlink(missing_ok=True)  # a process still mapping it keeps its pages (POSIX)
    for tmp in current.parent.glob(f"{slot}-*.npy.tmp-{socket.gethostname()}-*"):
        if not _alive(int(tmp.name.rsplit("-", 1)[1])):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, as set by SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
