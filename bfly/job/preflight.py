"""`python -m bfly.train --check --config ... [overrides]`: what a job would trip over, found before it is queued.

It validates the config and the dataset metadata, opens and fully decodes every image of the splits
training reads (in a process pool over the cores this process may use, with a progress line that
stays plain in a log file), and prints the plan: layout, classes, images per split, world size,
global batch, steps, checkpoint size, free disk and whether the run would resume, and from where.
Exit status 0 when training could start, 2 with one line per problem otherwise. It writes nothing:
the run directory is neither created nor touched (a checkpoint there is only read).

The world size is the real run's: `--nproc N`, else this launch's (torchrun or SLURM tasks), else
WORLD_SIZE, else 1.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from bfly.core import checkpoint as ckpt
from bfly.core.config import Config, ConfigError, load_config, run_dir_of
from bfly.core.data.decode_cache import _progress, available_cores
from bfly.core.data.metadata import DataError, DatasetMeta, load_metadata
from bfly.core.data.pil_input import open_rgb, small_images_warning, too_small
from bfly.core.data.sampling import StepPlan, steps_per_epoch
from bfly.core.env import dist_env, slurm_job_id, world_size_hint

_CHUNK = 32  # images per pool task: small enough for a smooth progress line


def preflight(
    config: str | None, overrides: list[str], nproc: int | None = None, images_checked_by: str | None = None
) -> int:
    """Prints the plan on stdout, progress and problems on stderr; returns 0 or 2. images_checked_by:
    the run whose check already decoded the same images (a grid's runs share their data)."""
    start = time.perf_counter()
    problems: list[str] = []
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        return _finish([str(e)], start)
    say = _printer()
    say("config", f"{config or '(defaults)'} {' '.join(overrides)}".strip())

    world, source = _world_size(nproc)
    plan = None
    try:
        if world < 1:
            raise ConfigError(f"--nproc {world}: the world size must be >= 1")
        plan = StepPlan.make(cfg.train.batch_size, world, cfg.train.micro_batch_size)
    except ConfigError as e:
        problems.append(str(e))
    say("world size", f"{world} process(es) ({source})")

    meta = _metadata(cfg, problems, say)
    if meta is not None and images_checked_by:
        say("images", f"the same data as {images_checked_by}: checked there")
    elif meta is not None:
        reads = list(meta.splits)  # the splits training reads: train and train.eval_splits
        paths = [p for s in reads for p in meta.splits[s].paths]
        workers = available_cores()  # SLURM's or taskset's CPU set, not the node's
        t0 = time.perf_counter()
        bad, small = check_images(paths, workers, cfg.data.image_size)
        problems += bad
        say(
            "images",
            f"{len(paths)} of {', '.join(reads)} opened and decoded in {time.perf_counter() - t0:.1f} s "
            f"({workers} process(es)): {len(bad)} unreadable",
        )
        if small:
            say("warning", small_images_warning(small, cfg.data.image_size))

    if plan is not None:
        say(
            "global batch",
            f"{plan.batch_size} = {world} rank(s) x {plan.accum_steps} accumulation step(s) x "
            f"{plan.micro_batch} micro-batch",
        )
        if meta is not None:
            _schedule(cfg, meta, plan, problems, say)
    _packages(cfg, plan, problems)
    _run_dir(cfg, meta, problems, say)
    if meta is not None:
        _resume(cfg, meta, world, problems, say)
    _device(say)
    return _finish(problems, start)


def check_images(paths: list[str], workers: int, image_size: int, progress: bool = True) -> tuple[list[str], list[str]]:
    """One problem line per image that cannot be opened and fully decoded, in `paths` order; and the
    images too small for `image_size` ("path (WxH)")."""
    report = _progress(
        f"bfly: checking {len(paths)} images ({workers} process(es))", len(paths), progress and bool(paths)
    )
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    problems: list[str] = []
    small: list[str] = []
    done = 0
    # fork: the workers inherit the imports (spawn would import torch once per worker); they only
    # decode with Pillow, so no CUDA or thread state is shared.
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("fork")) as pool:
        for chunk, (bad, chunk_small) in zip(chunks, pool.map(partial(_decode_chunk, image_size=image_size), chunks)):
            problems += bad
            small += chunk_small
            done += len(chunk)
            report(done)
    return problems, small


def _decode_chunk(paths: list[str], image_size: int) -> tuple[list[str], list[str]]:
    bad, small = [], []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. Pillow's DecompressionBombWarning: not a defect
                size = open_rgb(path).size
            if too_small(size, image_size):
                small.append(f"{path} ({size[0]}x{size[1]})")
        except DataError as e:
            bad.append(_one_line(str(e)))
        except Exception as e:  # anything else Pillow raises (e.g. DecompressionBombError) also fails training
            bad.append(_one_line(f"{path}: cannot decode image ({type(e).__name__}: {e})"))
    return bad, small


def _metadata(cfg: Config, problems: list[str], say: Callable[[str, str], None]) -> DatasetMeta | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            meta = load_metadata(cfg.data.root, splits=sorted({"train", *cfg.train.eval_splits}))
        except DataError as e:
            problems.append(str(e))
            meta = None
    for w in caught:
        say("warning", _one_line(str(w.message)))
    if meta is not None:
        counts = ", ".join(f"{name} {len(split.paths)}" for name, split in meta.splits.items())
        say("data", f"{meta.root} ({meta.layout} layout), {meta.num_classes} classes; images: {counts}")
    return meta


def _schedule(
    cfg: Config, meta: DatasetMeta, plan: StepPlan, problems: list[str], say: Callable[[str, str], None]
) -> None:
    n = len(meta.splits["train"].paths)
    steps = steps_per_epoch(n, plan.batch_size)
    if steps == 0:  # the same rule as bfly.train's
        problems.append(
            f"train.batch_size={cfg.train.batch_size} is larger than the train split "
            f"({n} images): no full batch per epoch"
        )
        return
    total = steps * cfg.train.epochs
    say(
        "schedule",
        f"{steps} steps/epoch x {cfg.train.epochs} epochs = {total} steps "
        f"(warmup {round(cfg.optim.warmup_epochs * steps)}; {n - steps * plan.batch_size} "
        "train images left out of each epoch's full batches)",
    )


def _packages(cfg: Config, plan: StepPlan | None, problems: list[str]) -> None:
    """What bfly imports lazily: missing now, missing at the first step or at the end of epoch 1."""
    mixing = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    needs_timm = [
        why
        for why, needed in (
            ("data.preset=timm", cfg.data.preset == "timm" and cfg.data.input == "pil"),
            ("data.mixup/data.cutmix", mixing),
        )
        if needed
    ]
    if needs_timm and importlib.util.find_spec("timm") is None:
        problems.append(f"{' and '.join(needs_timm)} need timm, which cannot be imported: pip install timm")
    if mixing and plan is not None and plan.micro_batch % 2:
        problems.append(
            f"data.mixup/data.cutmix need an even micro-batch; it is {plan.micro_batch} "
            "(set train.micro_batch_size or train.batch_size)"
        )
    if cfg.wandb.mode in ("online", "offline") and importlib.util.find_spec("wandb") is None:
        problems.append(f"wandb.mode={cfg.wandb.mode} but wandb cannot be imported: pip install wandb")


def checkpoint_estimate(cfg: Config, num_classes: int) -> tuple[int, int]:
    """(bytes of last.pt, bytes of best.pt), from the model's exact size."""
    import torch

    from bfly.core.models import build_model

    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = build_model(cfg.model.name, num_classes)
    last, best = ckpt.sizes(model, cfg.optim.name, cfg.optim.momentum, cfg.train.ema_decay > 0)  # as training asks
    return last, best


def _kept_count(cfg: Config) -> int:
    """Full checkpoints the policy keeps over the run: train.keep_last_n plus the epoch snapshots."""
    every = cfg.train.snapshot_every_epochs
    return cfg.train.keep_last_n + (cfg.train.epochs // every if every else 0)


def _kept(cfg: Config) -> str:
    n, every = cfg.train.keep_last_n, cfg.train.snapshot_every_epochs
    kept = "last.pt" + (", last.prev.pt" if n >= 2 else "") + (f", {n - 2} step-*.pt" if n > 2 else "")
    if every:
        kept += f", {cfg.train.epochs // every} epoch-*.pt snapshot(s)"
    return kept


def _run_dir(cfg: Config, meta: DatasetMeta | None, problems: list[str], say: Callable[[str, str], None]) -> None:
    run_dir = run_dir_of(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        problems.append(f"run directory {run_dir} is not a directory")
        return
    existing = run_dir.absolute()
    while not existing.exists():  # ends at "/" at the latest
        existing = existing.parent
    state = "exists" if existing == run_dir.absolute() else f"does not exist yet; would be created under {existing}"
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"run directory {run_dir} is not writable ({existing} is not)")
    free = shutil.disk_usage(existing).free
    if meta is None:
        say("run dir", f"{run_dir} ({state}); {_size(free)} free")
    else:
        last, best = checkpoint_estimate(cfg, meta.num_classes)
        # What training asks for at start-up (bfly.run.resume.space_needed: the retention policy; files already
        # there count).
        from bfly.run.resume import space_needed

        need = space_needed(run_dir if run_dir.is_dir() else existing, cfg, last, best)
        if free < need:
            problems.append(
                f"run directory {run_dir}: {free / 2**20:.0f} MiB free, checkpoints need about {need / 2**20:.0f} MiB"
            )
        say("run dir", f"{run_dir} ({state}); {_size(free)} free, training asks for {_size(need)}")
        say(
            "checkpoints",
            f"last.pt ~{_size(last)} (weights, optimizer state{', EMA' if cfg.train.ema_decay else ''}); "
            f"kept: {_kept(cfg)} and best.pt ~{_size(_kept_count(cfg) * last + best)}",
        )
    holder = _lock_holder(run_dir)
    if holder:
        problems.append(f"run directory {run_dir} is in use by another run ({holder})")


def _lock_holder(run_dir: Path) -> str | None:
    """The live holder of the run directory's lock, as training would see it (None: free or stale)."""
    from bfly.run.rundir import RunDirLock, this_process

    holder = RunDirLock(run_dir, this_process(slurm_job_id())).live_holder()
    return holder.describe() if holder else None


def _resume(cfg: Config, meta: DatasetMeta, world: int, problems: list[str], say: Callable[[str, str], None]) -> None:
    """The same choice as bfly.train's load_start_state, reading only."""
    run_dir, resume = run_dir_of(cfg), cfg.run.resume
    notes: list[str] = []
    try:
        if resume == "never":
            exists = (run_dir / ckpt.LAST).exists()
            say(
                "resume",
                "no: a fresh run (run.resume=never)"
                + (f"; it would overwrite {run_dir / ckpt.LAST}" if exists else ""),
            )
            return
        found = ckpt.find_start(run_dir, resume, notes.append)
        for note in notes:
            say("warning", note)
        if found is None:
            say("resume", f"no: a fresh run (no {ckpt.LAST} in {run_dir})")
            return
        saved, path = found
        from bfly.run.resume import check_resume, show  # the same refusals as the real resume

        changes = check_resume(cfg, meta, run_dir, saved, path)
    except (ckpt.CheckpointError, ConfigError) as e:
        problems.append(str(e))
        return
    if changes:
        say("changes", f"{show(changes)} (run.allow_changes)")
    where = (
        f"{path}: epoch {saved['epoch'] + 1}, step {saved['step_in_epoch']} of the epoch, "
        f"global step {saved['global_step']}"
    )
    if saved["epoch"] >= cfg.train.epochs:
        say(
            "resume",
            f"{where}: the run already finished {cfg.train.epochs} epochs, training would do nothing "
            "(raise train.epochs with run.allow_changes=[train.epochs], or pick another run.dir)",
        )
        return
    other = (
        f"; saved by {saved['world_size']} process(es), continued on {world}" if saved["world_size"] != world else ""
    )
    say("resume", f"yes, from {where}{other}")


def _device(say: Callable[[str, str], None]) -> None:
    import torch

    if torch.cuda.is_available():
        say("device", f"cuda, {torch.cuda.device_count()} GPU(s) visible here ({torch.cuda.get_device_name(0)})")
    else:
        say("device", "cpu (no CUDA device visible here)")


def _world_size(nproc: int | None) -> tuple[int, str]:
    if nproc is not None:
        return nproc, "--nproc"
    env = dist_env()
    if env.distributed:
        return env.world_size, env.source
    hint = world_size_hint()
    if hint is not None:
        return hint, "WORLD_SIZE"
    return 1, "default; --nproc N for the real run's"


def _printer() -> Callable[[str, str], None]:
    def say(what: str, text: str) -> None:
        print(f"  {what:<13} {text}", flush=True)

    print("bfly preflight:", flush=True)
    return say


def _finish(problems: list[str], start: float) -> int:
    seconds = time.perf_counter() - start
    if not problems:
        print(f"preflight: ok ({seconds:.1f} s)", flush=True)
        return 0
    for problem in problems:
        print(f"bfly.train --check: problem: {_one_line(problem)}", file=sys.stderr, flush=True)
    print(f"preflight: {len(problems)} problem(s) ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return 2


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"
