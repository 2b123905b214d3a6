"""Timed training and input cells: the measuring library under bfly.bench and bfly.gpu_check.

Every timed case trains through bfly.stack (the trainer bfly.train builds: DDP, compile, AMP policy,
optimizer, loss) and reports img/s, MFU (from a FLOP count of one step), peak memory and the fraction
of wall time spent waiting for the next batch.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from bfly.core import stack
from bfly.core.config import Config, replace as config_replace
from bfly.core.data.cached_input import CachedTrainInput, ResidentSplit
from bfly.core.data.metadata import Split, load_metadata
from bfly.core.data.pil_input import ImageDataset, PilTrainInput
from bfly.core.data.sampling import Sample, StepPlan, sample_seed
from bfly.core.data.transforms import build_train_transform
from bfly.core.engine import Trainer, new_sums, unwrap
from bfly.core.models import build_model

NUM_CLASSES = 100
# Dense tensor-core peak per GPU in TFLOP/s: (bf16/fp16, tf32). First matching name wins.
PEAK_TFLOPS = (
    ("GH200", (989, 494)),
    ("H200", (989, 494)),
    ("H100 NVL", (835, 418)),
    ("H100 PCIe", (756, 378)),
    ("H100", (989, 494)),
    ("A100", (312, 156)),
    ("L40S", (362, 183)),
)


@dataclass(frozen=True)
class Settings:
    batch_size: int = 256
    image_size: int = 224
    amp: str = "bf16"  # bf16 | fp16 | off
    channels_last: bool = True
    compile: bool = False
    compile_backend: str = "inductor"  # "eager": dynamo traces, no code generation (the CPU smoke run)
    ddp: bool = False
    steps: int = 30
    warmup: int = 10
    rounds: int = 3  # model-vs-reference: alternating timed rounds, median taken
    data: str = "data/butterfly-mini"
    cache_dir: str = ""
    workers: int = 4
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels for the (fixed) shapes
    peak_tflops: float = 0.0  # 0 = look the GPU up in PEAK_TFLOPS

    def tag(self) -> str:
        parts = [f"b{self.batch_size}", f"{self.image_size}px", self.amp]
        compiled = "compiled" if self.compile_backend == "inductor" else f"compiled({self.compile_backend})"
        parts += ["cl"] * self.channels_last + [compiled] * self.compile + ["ddp"] * self.ddp
        return " ".join(parts)


@dataclass
class Row:
    mode: str
    case: str
    settings: str = ""
    img_s: float | None = None
    mfu: float | None = None
    peak_gb: float | None = None
    wait: float | None = None  # fraction of wall time spent waiting for the next batch
    ratio: float | None = None
    ratio_of: str = ""  # what `ratio` divides by
    us_per_image: float | None = None  # host CPU time per image (host mode)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- small helpers -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, s: Settings) -> float | None:
    if s.peak_tflops:
        return s.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_TFLOPS:
        if key in name:
            return (half if s.amp != "off" else tf32) * 1e12
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def data_config(s: Settings, **data: Any) -> Config:
    """The training config these settings stand for (`data`: data.* keys), checked as an override is."""
    return config_replace(
        Config(),
        {
            "data.root": s.data,
            "data.image_size": s.image_size,
            "data.cache_dir": s.cache_dir,
            "train.batch_size": s.batch_size,
            "train.amp": s.amp,
            "model.channels_last": s.channels_last,
            "model.compile": s.compile,
            **{f"data.{k}": v for k, v in data.items()},
        },
    )


def train_split(s: Settings) -> Split:
    return load_metadata(s.data, splits=("train",)).splits["train"]


def endless(batches_of_epoch: Callable[[int], Iterator]) -> Iterator:
    """Batches across epochs, so a timed run may be longer than the (mini) split."""
    for epoch in itertools.count():
        yield from batches_of_epoch(epoch)


# --- the timed training loop -----------------------------------------------------------------------


def init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )


def make_trainer(model: nn.Module, device: torch.device, s: Settings, sync_bn: bool = False) -> Trainer:
    """The Trainer bfly.train builds (bfly.stack), around `model`, for the shipped config with these settings
    (sync_bn: its BatchNorm layers converted to our SyncBatchNorm2d, as a multi-process run does)."""
    cfg = data_config(s)
    if s.ddp:
        init_single_process_group(device)
    stack.configure_backends(cfg, device)  # what bfly.train sets: TF32, cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = s.cudnn_benchmark
    raw = stack.place_model(model, cfg, device, sync_bn=sync_bn)
    return stack.build_trainer(
        cfg, raw, device, NUM_CLASSES, accum_steps=1, steps_per_epoch=1, ddp=s.ddp, compile_backend=s.compile_backend
    )


def step_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: Settings) -> float:
    """FLOPs of one forward + backward (matmuls and convolutions), counted on the uncompiled model."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = stack.amp_policy(s.amp, images.device).dtype
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def synthetic_batches(device: torch.device, s: Settings) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=g).to(device)
    if s.channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (s.batch_size,), generator=g).to(device)
    return itertools.repeat((images, labels))


@dataclass
class Timing:
    img_s: float
    wait: float
    peak_gb: float | None


def time_training(trainer: Trainer, batches: Iterator, steps: int, warmup: int) -> Timing:
    """Wall-clock img/s of `steps` optimizer steps after `warmup` (compilation, cudnn autotuning)."""
    device = trainer.device
    sums = new_sums(device)
    trainer.model.train()

    def one_step() -> tuple[int, float]:
        t = time.perf_counter()
        images, labels = next(batches)
        waited = time.perf_counter() - t
        trainer.micro_step(images, labels, True, sums)
        trainer.optimizer_step()
        return labels.shape[0], waited

    for _ in range(warmup):
        one_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, images, waited = time.perf_counter(), 0, 0.0
    for _ in range(steps):
        n, w = one_step()
        images, waited = images + n, waited + w
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Timing(images / elapsed, waited / elapsed, peak)


def mfu(flops: float, timing: Timing, batch_size: int, peak: float | None) -> float | None:
    return flops * timing.img_s / batch_size / peak if peak else None


# --- model and end-to-end modes ----------------------------------------------------------------------


def build_reference(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=NUM_CLASSES)  # torchvision names its models as we do


def build_ours(name: str) -> nn.Module:
    return build_model(name, NUM_CLASSES)


def timed_alternately(
    makers: Mapping[str, Callable[[], Trainer]], s: Settings, device: torch.device
) -> tuple[dict[str, Trainer], dict[str, float], dict[str, list[Timing]]]:
    """Each trainer built from the same seed, its step's FLOPs counted and warmed up; then all of them timed on
    synthetic input in alternating rounds, so drift hits each alike. (trainers, FLOPs, timings), by key."""
    trainers, flops = {}, {}
    for key, make in makers.items():
        torch.manual_seed(0)
        trainers[key] = make()
        images, labels = next(synthetic_batches(device, s))
        flops[key] = step_flops(unwrap(trainers[key].model), images, labels, s)
        time_training(trainers[key], synthetic_batches(device, s), 0, s.warmup)
    timings: dict[str, list[Timing]] = {key: [] for key in makers}
    for _ in range(s.rounds):
        for key, trainer in trainers.items():
            timings[key].append(time_training(trainer, synthetic_batches(device, s), s.steps, 0))
    return trainers, flops, timings


def bench_model(
    name: str,
    s: Settings,
    device: torch.device,
    reference: bool = True,
    inputs: tuple[str, ...] = (),
    store: ResidentSplit | None = None,
) -> list[Row]:
    """Our model (and torchvision's) on synthetic input, then ours on the real data via `inputs`.

    Ours and the reference run alternating timed rounds (median kept), so drift hits both alike.
    The real-data runs reuse our model instance: a compiled model is compiled once.
    """
    if s.compile:
        torch._dynamo.reset()
    builders = {"ours": build_ours} | ({"torchvision": build_reference} if reference else {})
    makers = {
        who: partial(lambda build: make_trainer(build(name), device, s), build) for who, build in builders.items()
    }
    trainers, flops, timings = timed_alternately(makers, s, device)
    rows = [_median_row(f"{name} ({who}), synthetic", timings[who], flops[who], s, device) for who in builders]
    ours_img_s = rows[0].img_s
    assert ours_img_s is not None  # a timed row always has img/s
    if reference:
        rows[0].ratio, rows[0].ratio_of = ours_img_s / cast(float, rows[1].img_s), "torchvision"
    for kind in inputs:  # one input path failing (e.g. /dev/shm too small for PIL workers) keeps the others
        rows += guarded(
            "e2e",
            f"{name} (ours), real data via {kind}",
            s.tag(),
            partial(_real_data_rows, name, kind, trainers["ours"], flops["ours"], ours_img_s, s, device, store),
        )
    trainers.clear()
    free_memory(device)
    return rows


def bench_sync_bn(name: str, s: Settings, device: torch.device) -> list[Row]:
    """Our model with BatchNorm2d and with our SyncBatchNorm2d under DDP in a one-process group, on synthetic
    input, alternating timed rounds (median kept): what SyncBN's collectives cost a step on one device, compiled
    or not (the cost across GPUs needs several)."""
    if s.compile:
        torch._dynamo.reset()
    s = replace(s, ddp=True)
    variants = {"BatchNorm2d": False, "SyncBatchNorm2d": True}
    makers = {
        label: partial(lambda sync_bn: make_trainer(build_ours(name), device, s, sync_bn=sync_bn), sync_bn)
        for label, sync_bn in variants.items()
    }
    trainers, flops, timings = timed_alternately(makers, s, device)
    rows = [
        _median_row(f"{name} (ours, {label}), synthetic", timings[label], flops[label], s, device) for label in variants
    ]
    rows[1].ratio, rows[1].ratio_of = cast(float, rows[1].img_s) / cast(float, rows[0].img_s), "BatchNorm2d"
    trainers.clear()
    free_memory(device)
    return rows


def _real_data_rows(
    name: str,
    kind: str,
    trainer: Trainer,
    flops: float,
    synthetic_img_s: float,
    s: Settings,
    device: torch.device,
    store: ResidentSplit | None,
) -> list[Row]:
    """One row: our model trained on the real data through input path `kind` (a list, for `guarded`)."""
    train_input = cached_train_input(s, device, store) if kind == "cached" else pil_train_input(s, device)
    timing = time_training(trainer, endless(train_input.batches), s.steps, s.warmup)
    del train_input  # PIL workers end here
    settings = s.tag() + (f" w{s.workers}" if kind == "pil" else "")
    return [
        Row(
            "e2e",
            f"{name} (ours), real data via {kind}",
            settings,
            timing.img_s,
            mfu(flops, timing, s.batch_size, peak_flops(device, s)),
            timing.peak_gb,
            timing.wait,
            timing.img_s / synthetic_img_s,
            "synthetic",
        )
    ]


def _median_row(label: str, timings: list[Timing], flops: float, s: Settings, device: torch.device) -> Row:
    median = sorted(timings, key=lambda t: t.img_s)[len(timings) // 2]
    return Row(
        "model",
        label,
        s.tag(),
        median.img_s,
        mfu(flops, median, s.batch_size, peak_flops(device, s)),
        median.peak_gb,
        median.wait,
        extra={"img_s_rounds": [t.img_s for t in timings], "step_gflops": flops / 1e9},
    )


def cached_train_input(s: Settings, device: torch.device, store: ResidentSplit | None = None) -> CachedTrainInput:
    cfg = data_config(s, input="cached")
    plan = StepPlan.make(s.batch_size, 1, 0)
    return CachedTrainInput(train_split(s), cfg, plan, 0, device, store=store)


def pil_train_input(s: Settings, device: torch.device) -> PilTrainInput:
    plan = StepPlan.make(s.batch_size, 1, 0)
    transform = build_train_transform(data_config(s).data.preset, s.image_size)
    return PilTrainInput(train_split(s), transform, plan, 0, 0, device, s.workers, device.type == "cuda")


# --- input-only -------------------------------------------------------------------------------------


def bench_input(s: Settings, device: torch.device, store: ResidentSplit | None = None) -> list[Row]:
    rows = []
    for kind, make in (
        ("pil", lambda: pil_train_input(s, device)),
        ("cached", lambda: cached_train_input(s, device, store)),
    ):
        batches = endless(make().batches)
        for _ in range(s.warmup):
            next(batches)
        sync(device)
        start, n = time.perf_counter(), 0
        for _ in range(s.steps):
            n += next(batches)[1].shape[0]
        sync(device)
        label = f"input only, {kind}" + (f" ({s.workers} workers)" if kind == "pil" else f" (augment on {device.type})")
        rows.append(Row("input", label, f"b{s.batch_size} {s.image_size}px", n / (time.perf_counter() - start)))
    return rows


# --- host CPU time per image ------------------------------------------------------------------------


def bench_host(s: Settings, device: torch.device, images: int = 256) -> list[Row]:
    """Process CPU time per image on one thread, as in a DataLoader worker: the host's work per image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _host_rows(s, device, images)
    finally:
        torch.set_num_threads(threads)


def _host_rows(s: Settings, device: torch.device, images: int) -> list[Row]:
    split = train_split(s)
    n = min(images, len(split.paths))
    pil = _cpu_per_image_pil(split, s.image_size, n)
    train_input = cached_train_input(replace(s, batch_size=min(s.batch_size, len(split.paths))), torch.device("cpu"))
    plan_only, gather = _cpu_per_image_cached(train_input, n)
    rows = [
        Row("host", f"PIL decode + {Config().data.preset} augment", f"{s.image_size}px, 1 process", us_per_image=pil),
        Row(
            "host",
            "cached, split in GPU memory (epoch plan)",
            f"{s.image_size}px",
            us_per_image=plan_only,
            ratio=pil / plan_only,
            ratio_of="PIL per image / this",
            note="+ ~20 kernel launches per batch",
        ),
        Row(
            "host",
            "cached, split in host memory (plan + gather" + (" + pin)" if torch.cuda.is_available() else ")"),
            f"{s.image_size}px",
            us_per_image=gather,
            ratio=pil / gather,
            ratio_of="PIL per image / this",
        ),
    ]
    if device.type == "cpu":
        rows.append(
            Row(
                "host",
                "cached, augmented on this CPU (not the design)",
                f"{s.image_size}px",
                us_per_image=_cpu_per_image_augment(train_input, n),
                note="grid_sample augmentation is fast only on a GPU",
            )
        )
    return rows


def _cpu_per_image_pil(split: Split, size: int, n: int) -> float:
    dataset = ImageDataset(split, build_train_transform(Config().data.preset, size))
    dataset[Sample(0, 0)]  # imports and first-call set-up are not per-image work
    start = time.process_time()
    for i in range(n):
        dataset[Sample(i, sample_seed(0, 0, i))]
    return (time.process_time() - start) / n * 1e6


def _cpu_per_image_cached(train_input: CachedTrainInput, n: int) -> tuple[float, float]:
    """(epoch plan, epoch plan + gather into a staging buffer) in microseconds per image.

    The plan is timed for a whole epoch (it is made once per epoch); the gather for about n images,
    after one untimed pass so that the memory-mapped pages are resident, as during training.
    """
    store, pin = train_input.store, torch.cuda.is_available()
    start = time.process_time()
    index, _ = train_input.epoch_plan(0)
    plan_us = (time.process_time() - start) / index.numel() * 1e6
    micro = index[: max(1, -(-n // index.shape[1]))]

    def gather() -> None:
        for rows in micro:
            buf = torch.empty((len(rows), *store.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
            torch.index_select(store.images, 0, rows, out=buf)

    gather()
    start = time.process_time()
    gather()
    return plan_us, plan_us + (time.process_time() - start) / micro.numel() * 1e6


def _cpu_per_image_augment(train_input: CachedTrainInput, n: int) -> float:
    index, params = train_input.epoch_plan(0)
    micro = index[0]
    images = train_input.store.images.index_select(0, micro)
    train_input.augment(images, params[0])
    start = time.process_time()
    reps = max(1, n // len(micro))
    for _ in range(reps):
        train_input.augment(images, params[0])
    return (time.process_time() - start) / (reps * len(micro)) * 1e6


# --- output -----------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'mode':<6} {'case':<52} {'settings':<28} {'img/s':>8} {'MFU':>6} {'peak GB':>7} {'wait':>6} "
        f"{'us/img':>8} {'ratio':>7}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else "")
        note = "; ".join(x for x in (f"vs {r.ratio_of}" if r.ratio_of else "", r.note) if x)
        lines.append(
            f"{r.mode:<6} {r.case[:52]:<52} {r.settings[:28]:<28} {_fmt(r.img_s, '8.0f'):>8} "
            f"{_fmt(r.mfu and r.mfu * 100, '5.1f') + ('%' if r.mfu else ''):>6} {_fmt(r.peak_gb, '7.1f'):>7} "
            f"{_fmt(r.wait and r.wait * 100, '5.1f') + ('%' if r.wait is not None else ''):>6} "
            f"{_fmt(r.us_per_image, '8.1f'):>8} {ratio:>7}  {note}"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torchvision

    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | Path, rows: list[Row], settings: Settings) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        json.dumps(
            {"environment": environment(), "settings": asdict(settings), "rows": [asdict(r) for r in rows]}, indent=2
        )
        + "\n"
    )


def guarded(mode: str, case: str, settings: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one cell; a failure becomes a row of the table instead of ending the run."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        message = str(e).strip().splitlines()
        free_memory(stack.pick_device())
        return [Row(mode, case, settings, note=f"FAILED: {type(e).__name__}: {message[0][:160] if message else ''}")]
