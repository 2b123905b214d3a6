"""Checkpoints: what they hold, written atomically by rank 0, read with weights_only=True after a CRC check.

What is in a checkpoint is written here once (`identity`, `last_payload`, `best_payload`) and checked
here (`check_compatible`, `check_resumable`, `check_trained`, `check_classes`): every checkpoint carries
the identity (arch, classes, config, position); last.pt adds what a resume needs (optimizer, scheduler,
scaler, EMA, mid-epoch sums, every rank's RNG state, world size); best.pt holds the weights training
evaluated (the EMA's when there is one) and the metrics that made it the best.

`last.pt` is replaced by write-to-temp, fsync, rename; the one it replaces is kept as
`last.prev.pt`, so a crash at any point leaves at least one complete checkpoint, and a corrupt
`last.pt` falls back to the previous one with a warning.

What is kept (train.keep_last_n, train.snapshot_every_epochs): the newest N full checkpoints roll
through `last.pt` -> `last.prev.pt` -> `step-<global step>.pt` by renames (never rewritten); older
`step-*.pt` files are deleted only after the new `last.pt` is in place, and `last.pt`, `last.prev.pt`
(what a resume picks, `find_start`), the temp file of a write, `best.pt` and the `epoch-<E>.pt`
snapshots are never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bfly.core.errors import one_line

LAST, PREV, BEST = "last.pt", "last.prev.pt", "best.pt"
ROLLED = re.compile(r"step-(\d+)\.pt")  # older full checkpoints kept by train.keep_last_n
SNAPSHOT = re.compile(r"epoch-(\d+)\.pt")  # train.snapshot_every_epochs: kept forever


def rolled_name(global_step: int) -> str:
    return f"step-{global_step:07d}.pt"


def snapshot_name(epoch: int) -> str:
    return f"epoch-{epoch:03d}.pt"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(CheckpointError):
    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"no space left on device while writing {path.name} in {path.parent}")


def save_atomic(
    state: dict[str, Any],
    path: Path,
    keep_previous: bool = False,
    roll_to: Path | None = None,
    half_written: Callable[[Path], None] | None = None,
) -> None:
    """Write-to-temp, fsync, rename. On a full disk the temp file is removed and the file it would have
    replaced is untouched. keep_previous: the replaced file becomes last.prev.pt; roll_to: the replaced
    last.prev.pt is renamed there first (else it is replaced). Renames only, each atomic, and only once
    the temp file is complete: a kill at any point leaves every earlier complete checkpoint under a name.
    half_written: called with the temp file of a write that replaces a file, before it is complete (the
    tail of the temp file is still in this process's buffer): tests kill the process there."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(_compact(state), f)
            if half_written is not None and keep_previous and path.exists():
                half_written(tmp)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_disk_full(e):
            raise DiskFullError(path) from None
        raise
    if keep_previous and path.exists():
        prev = path.with_name(PREV)
        if roll_to is not None and prev.exists():
            os.replace(prev, roll_to)
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def saved_step(path: Path) -> int | None:
    """The global step a checkpoint file holds, read without loading its tensors (mmap); None if unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # a damaged file: it is not rolled, only replaced
        return None


def prune(run_dir: Path, keep_last_n: int) -> list[Path]:
    """Deletes the full checkpoints beyond the newest `keep_last_n` (last.pt and last.prev.pt count first;
    step-*.pt newest first by write time). Called only once the new last.pt is in place. Returns what
    was deleted."""
    gone = []
    if keep_last_n < 2 and (run_dir / PREV).exists():
        gone.append(run_dir / PREV)
    rolled = [(p.stat().st_mtime_ns, int(m[1]), p) for p in run_dir.iterdir() if (m := ROLLED.fullmatch(p.name))]
    # Newest write first (a rename keeps the time of the write), then the step: a file left by an
    # abandoned branch (run.resume=<older checkpoint>) goes before what this run wrote.
    rolled.sort(reverse=True)
    gone += [p for _, _, p in rolled[max(0, keep_last_n - 2) :]]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def link_snapshot(src: Path, snapshot: Path, payload: dict[str, Any]) -> None:
    """`snapshot` holds the same checkpoint as the complete file `src`: a hard link (no copy, no extra space
    while `src` is kept), or a write of `payload` where the file system has no hard links."""
    tmp = snapshot.with_name(f".{snapshot.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        save_atomic(payload, snapshot)
        return
    os.replace(tmp, snapshot)
    _fsync_dir(snapshot.parent)


def _is_disk_full(e: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError from its zip writer ("unexpected pos ..."),
    # not as an OSError: look for the errno, then for the message.
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "No space left" in str(e))


def to_host(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor copied to host memory: what training changes next
    cannot reach it. The synchronous part of a checkpoint: the rest can be written in the background.
    (HostStaging does the same through one reused buffer.)"""
    return HostStaging().to_host(obj)


def _tensors(obj: Any, found: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every tensor in a nested state, once (a tensor in two places is copied once), by id."""
    if isinstance(obj, torch.Tensor):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, found)
    return found


def _rebuild(obj: Any, host: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return host[id(obj)]
    if isinstance(obj, dict):
        return {k: _rebuild(v, host) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild(v, host) for v in obj)
    return obj


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` (detached) with its elements in one dense run of memory: as it is when it already is (NCHW or
    channels-last), else a contiguous copy."""
    t = t.detach()
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


class HostStaging:
    """Copies checkpoint states to host memory through one flat byte buffer, reused from save to save
    (pinned when the state is on a GPU). The device's tensors are packed into one flat device buffer and
    copied to the host in ONE asynchronous copy, waited for once, instead of one blocking copy per
    tensor. Host tensors returned are views into the buffer: they stay valid until the next `to_host`
    (the caller finishes writing them first)."""

    ALIGN = 64  # every tensor starts at a multiple of this many bytes (any dtype can view it)

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def to_host(self, obj: Any) -> Any:
        found = _tensors(obj, {})
        tensors = {i: _dense(t) for i, t in found.items()}
        devices = {t.device for t in tensors.values() if t.device.type != "cpu"}
        if len(devices) > 1:  # a state spread over several devices: tensor by tensor
            return _rebuild(obj, {i: t.to("cpu", copy=True) for i, t in tensors.items()})
        on_device = [i for i, t in tensors.items() if t.device.type != "cpu"]
        on_host = [i for i, t in tensors.items() if t.device.type == "cpu"]
        offsets: dict[int, int] = {}
        device_bytes = self._place(on_device, tensors, offsets, 0)
        host = self._host_buffer(self._place(on_host, tensors, offsets, device_bytes), pin=bool(devices))
        if devices:
            (device,) = devices
            packed = torch.empty(device_bytes, dtype=torch.uint8, device=device)
            for i in on_device:
                _bytes_into(packed, offsets[i], tensors[i])
            host[:device_bytes].copy_(packed, non_blocking=True)  # the one device-to-host copy
        for i in on_host:
            _bytes_into(host, offsets[i], tensors[i])
        if devices and device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
            copied.synchronize()  # the one wait: the copy has landed in host memory
        return _rebuild(obj, {i: _view(host, offsets[i], t) for i, t in tensors.items()})

    def _place(self, ids: list[int], tensors: dict[int, torch.Tensor], offsets: dict[int, int], start: int) -> int:
        """Byte offsets of `ids`' tensors from `start` (each aligned); returns where the last one ends."""
        for i in ids:
            offsets[i] = start
            start += -(-tensors[i].numel() * tensors[i].element_size() // self.ALIGN) * self.ALIGN
        return start

    def _host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin and torch.cuda.is_available())
        return self.buffer


def _compact(obj: Any) -> Any:
    """`obj` with every tensor that views a larger storage (HostStaging's buffer) copied out: torch.save
    writes a view's whole storage, and each tensor of a file must hold its own bytes only."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj


def _bytes_into(flat: torch.Tensor, offset: int, t: torch.Tensor) -> None:
    nbytes = t.numel() * t.element_size()
    if nbytes:
        elements = t.as_strided((t.numel(),), (1,))  # the dense run of memory, in memory order
        flat[offset : offset + nbytes].view(t.dtype).copy_(elements)


def _view(flat: torch.Tensor, offset: int, t: torch.Tensor) -> torch.Tensor:
    """`t`'s host copy inside `flat`: same dtype, shape and strides (channels-last stays channels-last)."""
    region = flat[offset : offset + t.numel() * t.element_size()].view(t.dtype)
    return region.as_strided(t.shape, t.stride())


@dataclass
class Write:
    payload: dict[str, Any]  # already on the host (to_host)
    path: Path
    keep_previous: bool = False  # last.pt: the rolling file (keep_last_n says how many are kept)
    step: int = 0
    keep_last_n: int = 2  # with keep_previous: full checkpoints kept (last.pt, last.prev.pt, step-*.pt)
    snapshot: Path | None = None  # also kept under this name, forever (epoch-<E>.pt)


class CheckpointWriter:
    """Writes checkpoints in a background thread, at most one batch of files in flight.

    `submit` waits for the write in flight, then hands the new one over and returns: the caller has
    already copied the state off the device, so training goes on while the file is written, fsync'ed
    and renamed. An error of a background write is raised by the next `submit` or `wait`. With
    asynchronous=False every write happens in `submit` (the reference to measure the stall against).
    before_write: save_atomic's half_written, for each write that replaces last.pt.
    """

    def __init__(self, asynchronous: bool = True, before_write: Callable[[Path], None] | None = None):
        self.asynchronous, self.before_write = asynchronous, before_write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.intact: dict[str, int] = {}  # file name -> step of the newest complete write

    def submit(self, writes: list[Write]) -> None:
        self.wait()
        if not self.asynchronous:
            self._write_all(writes)
            self._raise()
            return
        self._thread = threading.Thread(target=self._write_all, args=(writes,), name="bfly-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, DiskFullError):
            name = error.path.name
            step = self.intact.get(name)
            if step is not None:
                kept = f"{name} (step {step}) is intact"
            else:
                kept = f"{name} is intact" if error.path.exists() else f"no earlier {name} exists"
            raise CheckpointError(f"{error}; {kept}") from None
        raise error

    def _write_all(self, writes: list[Write]) -> None:
        try:
            for w in writes:
                if not w.keep_previous:
                    save_atomic(w.payload, w.path)
                else:
                    self._write_rolling(w)
                self.intact[w.path.name] = w.step
                if w.snapshot is not None:
                    link_snapshot(w.path, w.snapshot, w.payload)
                if w.keep_previous:  # the new file is in place: now older ones may go
                    prune(w.path.parent, w.keep_last_n)
        except BaseException as e:  # raised in the training thread by the next submit/wait
            self._error = e

    def _write_rolling(self, w: Write) -> None:
        prev = w.path.with_name(PREV)
        keep_prev = w.keep_last_n >= 2 and w.path.exists()
        roll_to = None
        if keep_prev and w.keep_last_n > 2 and prev.exists():
            step = self.intact.get(PREV)
            step = saved_step(prev) if step is None else step  # a file of an earlier job
            roll_to = None if step is None else w.path.with_name(rolled_name(step))
        save_atomic(w.payload, w.path, keep_prev, roll_to, self.before_write)
        if keep_prev and LAST in self.intact:
            self.intact[PREV] = self.intact[LAST]
        else:
            self.intact.pop(PREV, None)


def _check_crc(path: Path) -> None:
    """torch.load does not verify the zip's CRC-32s: flipped bytes inside a tensor would load as
    silently wrong weights. Checking them costs one read of the file."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"CRC-32 mismatch in {bad}")


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        _check_crc(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): it holds more than tensors and plain "
            f"data ({one_line(e, first=True)}); only load checkpoints you trust, and re-save them with bfly"
        ) from None
    # A damaged header can surface as a decode error (ValueError) from zipfile or the unpickler.
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({one_line(e, first=True)})") from None


def find_start(run_dir: Path, resume: str, warn) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint a run starts from, as run.resume says: `auto` the run directory's newest complete
    one (None for a fresh run), `never` none, else the file it names (a snapshot, a step-*.pt), as a path
    or as a name in the run directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return load_resumable(run_dir, warn)
    path = Path(resume)
    if not path.exists() and (run_dir / path).is_file():  # run.resume=epoch-030.pt: a file of the run directory
        path = run_dir / path
    return load(path), path


def load_resumable(run_dir: Path, warn) -> tuple[dict[str, Any], Path] | None:
    """The newest complete checkpoint of a run directory and its path, or None for a fresh run."""
    last, prev = run_dir / LAST, run_dir / PREV
    if not last.exists():
        if prev.exists():  # killed between the two renames
            warn(f"{last} missing; resuming from {prev}")
            return load(prev), prev
        return None
    try:
        return load(last), last
    except CheckpointError as e:
        if not prev.exists():
            raise
        warn(f"{e}; falling back to the previous checkpoint {prev}")
        return load(prev), prev


# --- the format ------------------------------------------------------------------------------------

IDENTITY_KEYS = ("arch", "num_classes", "class_names", "config", "model")  # what evaluate/predict need


def identity(
    cfg: dict[str, Any],
    class_names: list[str],
    train_images: int,
    epoch: int,
    global_step: int,
    wandb_run_id: str | None,
) -> dict[str, Any]:
    """What every checkpoint carries to be loaded safely elsewhere (evaluate, predict, resume).
    `cfg`: the run's config as a dict (config.to_dict)."""
    return {
        "arch": cfg["model"]["name"],
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "train_images": train_images,
        "config": cfg,
        "epoch": epoch,
        "global_step": global_step,
        "wandb_run_id": wandb_run_id,
    }


def best_payload(ident: dict[str, Any], weights: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """best.pt: the weights training evaluated (the EMA's when there is one) and their metrics."""
    return ident | {"model": weights, "metrics": metrics}


def last_payload(
    ident: dict[str, Any],
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    total_steps: int,
    scaler: dict[str, Any] | None,
    ema: dict[str, Any] | None,
    step_in_epoch: int,
    best_top1: float,
    epoch_sums: dict[str, torch.Tensor],
    rng: list[dict[str, Any]],
    world_size: int,
) -> dict[str, Any]:
    """last.pt: everything a resume needs, mid-epoch included (`rng`: every rank's, in rank order)."""
    return ident | {
        "model": model,
        "optimizer": optimizer,
        "scheduler": {"global_step": ident["global_step"], "total_steps": total_steps},
        "scaler": scaler,
        "ema": ema,
        "step_in_epoch": step_in_epoch,
        "best_top1": best_top1,
        "epoch_sums": epoch_sums,
        "rng": rng,
        "world_size": world_size,
    }


def saved_micro_batch_size(state: dict[str, Any]) -> int:
    """train.micro_batch_size of the run that wrote `state` (0 = batch size / world size)."""
    return state.get("config", {}).get("train", {}).get("micro_batch_size", 0)


def sizes(model: Any, optimizer_name: str, momentum: float, ema: bool) -> tuple[int, int]:
    """(last.pt, best.pt) bytes for `model` (an nn.Module), from its weights and the optimizer's
    per-parameter state (AdamW: two tensors; SGD: one with momentum)."""
    weights = state_bytes(model.state_dict())
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_param = 2 if optimizer_name == "adamw" else int(momentum > 0)
    return weights + per_param * params + (weights if ema else 0), weights


def check_trained(state: dict[str, Any], path: str | Path, known_archs: tuple[str, ...]) -> None:
    """A checkpoint evaluate and predict can load: a bfly checkpoint of a model bfly builds."""
    for key in IDENTITY_KEYS:
        if key not in state:
            raise CheckpointError(f"{path}: not a bfly checkpoint (no {key!r} entry)")
    if state["arch"] not in known_archs:
        raise CheckpointError(f"{path}: checkpoint is a {state['arch']!r} model; bfly builds {', '.join(known_archs)}")


def check_classes(state: dict[str, Any], path: str | Path, class_names: list[str], root: Any) -> None:
    """The dataset labels its classes as the checkpoint's did (ids and names)."""
    check_compatible(state, path, state["arch"], len(class_names))
    for i, (ours, theirs) in enumerate(zip(state["class_names"], class_names)):
        if ours != theirs:
            raise CheckpointError(
                f"{path}: class id {i} is {ours!r} in the checkpoint but {theirs!r} in {root}: "
                "the dataset labels its species differently from the one the model was trained on"
            )


def check_compatible(state: dict[str, Any], path: str | Path, arch: str, num_classes: int) -> None:
    for key in ("arch", "num_classes", "model"):
        if key not in state:
            raise CheckpointError(f"{path}: not a bfly checkpoint (no {key!r} entry)")
    if state["arch"] != arch:
        raise CheckpointError(f"{path}: checkpoint is a {state['arch']} model, this run builds {arch}")
    if state["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: checkpoint has {state['num_classes']} classes, this dataset has {num_classes}")


def check_resumable(state: dict[str, Any], path: str | Path) -> None:
    for key in ("optimizer", "global_step", "epoch_sums", "rng"):
        if key not in state:
            raise CheckpointError(
                f"{path}: holds weights only (no {key!r} entry), it cannot resume a run; resume from a {LAST}"
            )


def ensure_writable(run_dir: Path) -> None:
    """Fail at start-up, not after an epoch: the directory must exist (it is created) and be writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state: what torch.save writes, give or take its headers."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def space_needed(run_dir: Path, last_bytes: int, best_bytes: int, keep_last_n: int = 2, snapshots: int = 0) -> int:
    """Free bytes a run still needs as its policy keeps files: at the peak of a write, the `keep_last_n`
    full checkpoints (last.pt, last.prev.pt, step-*.pt), best.pt, the temp file of the next last.pt and
    the run's `snapshots` epoch-*.pt exist together. Files already there count as room already taken
    (a hard-linked snapshot once)."""
    seen, existing = set(), 0
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        if p.name in (LAST, PREV, BEST) or ROLLED.fullmatch(p.name) or SNAPSHOT.fullmatch(p.name):
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                existing += st.st_size
    if (run_dir / LAST).exists():
        last_bytes = max(last_bytes, (run_dir / LAST).stat().st_size)  # the real size beats the estimate
    margin = 16 * 2**20 + last_bytes // 50  # zip headers, metadata, the pickled config
    return max(0, (keep_last_n + 1 + snapshots) * last_bytes + best_bytes - existing) + margin


def ensure_space(run_dir: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise CheckpointError(
            f"run directory {run_dir}: {free / 2**20:.0f} MiB free, checkpoints need about {need_bytes / 2**20:.0f} MiB"
        )


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: ("MT19937", keys, pos, has_gauss, cached_gaussian)

    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        # This rank's own device only: get_rng_state_all would create a CUDA context (~0.5 GB) on
        # every visible GPU, and could not be restored where fewer GPUs are visible.
        "cuda": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = own_cuda_state(state["cuda"], torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def own_cuda_state(saved: torch.Tensor | list[torch.Tensor] | None, device_index: int) -> torch.Tensor | None:
    """The CUDA RNG state to restore on device `device_index`. Checkpoints of older versions hold a list
    with one state per visible device: take this device's entry, or the first if fewer were visible."""
    if isinstance(saved, (list, tuple)):
        if not saved:
            return None
        return saved[device_index] if device_index < len(saved) else saved[0]
    return saved
