"""Throughput benchmark: where training time goes, and what the input path costs. Not a test.

    python -m bfly.bench                          # CPU: host CPU time per image, PIL path vs cached path
    python -m bfly.bench --mode model --compile   # our models vs torchvision's, synthetic input
    python -m bfly.bench --mode all --data /data/butterflies --json bench.json

Modes (comma-separated; auto = host on a CPU-only machine, all on a GPU):
  host   host CPU time per image: PIL decode + augment vs the cached path's host share
         (epoch plan, gather from the cache, pin; its augmentation runs on the device)
  input  input-only throughput: PIL path with --workers workers, cached path (augmented on the device)
  model  model-only on synthetic input, ours and torchvision's reference in the identical loop
  e2e    end to end on the real data, cached path (and PIL with --e2e-pil), against synthetic input
Each timed case reports img/s, MFU (from a FLOP count of one step), peak memory and the fraction
of wall time spent waiting for the next batch.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bfly.config import Config, DistConfig, OptimConfig
from bfly.data.cached_input import CachedTrainInput, ResidentSplit
from bfly.data.decode_cache import available_cores
from bfly.data.metadata import Split, load_metadata
from bfly.data.pil_input import ImageDataset, PilTrainInput
from bfly.data.sampling import Sample, StepPlan, sample_seed
from bfly.data.transforms import build_train_transform
from bfly.engine import Schedule, Trainer, new_sums
from bfly.models import build_model
from bfly.optim import build_optimizer

NUM_CLASSES = 100
# Dense tensor-core peak per GPU in TFLOP/s: (bf16/fp16, tf32). First matching name wins.
PEAK_TFLOPS = (("GH200", (989, 494)), ("H200", (989, 494)), ("H100 NVL", (835, 418)),
               ("H100 PCIe", (756, 378)), ("H100", (989, 494)), ("A100", (312, 156)), ("L40S", (362, 183)))
REFERENCES = {"resnet50": "resnet50", "vgg19": "vgg19", "vgg19_bn": "vgg19_bn"}  # torchvision names


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

def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


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
    """The training config these settings stand for (set directly: a path is not YAML)."""
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.cache_dir = s.data, s.image_size, s.cache_dir
    cfg.train.batch_size = s.batch_size
    cfg.model.channels_last, cfg.model.compile = s.channels_last, s.compile
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def make_trainer(model: nn.Module, device: torch.device, s: Settings) -> Trainer:
    """Our Trainer around `model`, as bfly.train builds it (DDP, then compile); SGD, no schedule."""
    model = model.to(device)
    if s.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    wrapped: nn.Module = model
    if s.ddp:
        init_single_process_group(device)
        d = DistConfig()
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=d.bucket_cap_mb, gradient_as_bucket_view=d.gradient_as_bucket_view)
    if s.compile:
        wrapped = torch.compile(wrapped, backend=s.compile_backend)
    dtype = amp_dtype(s.amp)
    return Trainer(
        model=wrapped, optimizer=build_optimizer(model, OptimConfig()),
        scaler=torch.amp.GradScaler(device.type) if s.amp == "fp16" else None,
        schedule=Schedule(1, 0, 0.1, 0.0), criterion=nn.CrossEntropyLoss(), device=device,
        amp_dtype=dtype,
        accum_steps=1, clip_grad_norm=0.0, channels_last=s.channels_last and device.type == "cuda",
    )


def step_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: Settings) -> float:
    """FLOPs of one forward + backward (matmuls and convolutions), counted on the uncompiled model."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = amp_dtype(s.amp)
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

    return getattr(torchvision.models, REFERENCES[name])(num_classes=NUM_CLASSES)


def build_ours(name: str) -> nn.Module:
    return build_model(name, NUM_CLASSES)


def bench_model(name: str, s: Settings, device: torch.device, reference: bool = True,
                inputs: tuple[str, ...] = (), store: ResidentSplit | None = None) -> list[Row]:
    """Our model (and torchvision's) on synthetic input, then ours on the real data via `inputs`.

    Ours and the reference run alternating timed rounds (median kept), so drift hits both alike.
    The real-data runs reuse our model instance: a compiled model is compiled once.
    """
    if s.compile:
        torch._dynamo.reset()
    builders = {"ours": build_ours} | ({"torchvision": build_reference} if reference else {})
    trainers, flops = {}, {}
    for who, build in builders.items():
        torch.manual_seed(0)
        trainers[who] = make_trainer(build(name), device, s)
        images, labels = next(synthetic_batches(device, s))
        flops[who] = step_flops(_raw(trainers[who].model), images, labels, s)
        time_training(trainers[who], synthetic_batches(device, s), 0, s.warmup)
    timings: dict[str, list[Timing]] = {who: [] for who in builders}
    for _ in range(s.rounds):
        for who, trainer in trainers.items():
            timings[who].append(time_training(trainer, synthetic_batches(device, s), s.steps, 0))
    rows = [_median_row(f"{name} ({who}), synthetic", timings[who], flops[who], s, device) for who in builders]
    if reference:
        rows[0].ratio, rows[0].ratio_of = rows[0].img_s / rows[1].img_s, "torchvision"
    for kind in inputs:  # one input path failing (e.g. /dev/shm too small for PIL workers) keeps the others
        rows += guarded("e2e", f"{name} (ours), real data via {kind}", s.tag(), lambda: [_real_data_row(
            name, kind, trainers["ours"], flops["ours"], rows[0].img_s, s, device, store)])
    trainers.clear()
    free_memory(device)
    return rows


def _real_data_row(name: str, kind: str, trainer: Trainer, flops: float, synthetic_img_s: float, s: Settings,
                   device: torch.device, store: ResidentSplit | None) -> Row:
    train_input = cached_train_input(s, device, store) if kind == "cached" else pil_train_input(s, device)
    timing = time_training(trainer, endless(train_input.batches), s.steps, s.warmup)
    del train_input  # PIL workers end here
    settings = s.tag() + (f" w{s.workers}" if kind == "pil" else "")
    return Row("e2e", f"{name} (ours), real data via {kind}", settings, timing.img_s,
               mfu(flops, timing, s.batch_size, peak_flops(device, s)), timing.peak_gb, timing.wait,
               timing.img_s / synthetic_img_s, "synthetic")


def _raw(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _median_row(label: str, timings: list[Timing], flops: float, s: Settings, device: torch.device) -> Row:
    median = sorted(timings, key=lambda t: t.img_s)[len(timings) // 2]
    return Row("model", label, s.tag(), median.img_s, mfu(flops, median, s.batch_size, peak_flops(device, s)),
               median.peak_gb, median.wait,
               extra={"img_s_rounds": [t.img_s for t in timings], "step_gflops": flops / 1e9})


def cached_train_input(s: Settings, device: torch.device, store: ResidentSplit | None = None) -> CachedTrainInput:
    cfg = data_config(s, input="cached")
    plan = StepPlan.make(s.batch_size, 1, 0)
    return CachedTrainInput(train_split(s), cfg, plan, 0, device, store=store)


def pil_train_input(s: Settings, device: torch.device) -> PilTrainInput:
    plan = StepPlan.make(s.batch_size, 1, 0)
    transform = build_train_transform("seed", s.image_size)
    return PilTrainInput(train_split(s), transform, plan, 0, 0, device, s.workers, device.type == "cuda")


# --- input-only -------------------------------------------------------------------------------------

def bench_input(s: Settings, device: torch.device, store: ResidentSplit | None = None) -> list[Row]:
    rows = []
    for kind, make in (("pil", lambda: pil_train_input(s, device)),
                       ("cached", lambda: cached_train_input(s, device, store))):
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
        Row("host", "PIL decode + seed augment", f"{s.image_size}px, 1 process", us_per_image=pil),
        Row("host", "cached, split in GPU memory (epoch plan)", f"{s.image_size}px", us_per_image=plan_only,
            ratio=pil / plan_only, ratio_of="PIL per image / this", note="+ ~20 kernel launches per batch"),
        Row("host", "cached, split in host memory (plan + gather" + (" + pin)" if torch.cuda.is_available() else ")"),
            f"{s.image_size}px", us_per_image=gather, ratio=pil / gather, ratio_of="PIL per image / this"),
    ]
    if device.type == "cpu":
        rows.append(Row("host", "cached, augmented on this CPU (not the design)", f"{s.image_size}px",
                        us_per_image=_cpu_per_image_augment(train_input, n),
                        note="grid_sample augmentation is fast only on a GPU"))
    return rows


def _cpu_per_image_pil(split: Split, size: int, n: int) -> float:
    dataset = ImageDataset(split, build_train_transform("seed", size))
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
    header = f"{'mode':<6} {'case':<52} {'settings':<28} {'img/s':>8} {'MFU':>6} {'peak GB':>7} {'wait':>6} " \
             f"{'us/img':>8} {'ratio':>7}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else "")
        note = "; ".join(x for x in (f"vs {r.ratio_of}" if r.ratio_of else "", r.note) if x)
        lines.append(f"{r.mode:<6} {r.case[:52]:<52} {r.settings[:28]:<28} {_fmt(r.img_s, '8.0f'):>8} "
                     f"{_fmt(r.mfu and r.mfu * 100, '5.1f') + ('%' if r.mfu else ''):>6} {_fmt(r.peak_gb, '7.1f'):>7} "
                     f"{_fmt(r.wait and r.wait * 100, '5.1f') + ('%' if r.wait is not None else ''):>6} "
                     f"{_fmt(r.us_per_image, '8.1f'):>8} {ratio:>7}  {note}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torchvision

    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | Path, rows: list[Row], settings: Settings) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"environment": environment(), "settings": asdict(settings),
                                      "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


def guarded(mode: str, case: str, settings: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one cell; a failure becomes a row of the table instead of ending the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of one cell is reported, the others still run
        traceback.print_exc(file=sys.stderr)
        message = str(e).strip().splitlines()
        free_memory(default_device())
        return [Row(mode, case, settings, note=f"FAILED: {type(e).__name__}: {message[0][:160] if message else ''}")]


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bfly.bench", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument("--mode", default="auto", help="host,input,model,e2e, all or auto (default: auto)")
    p.add_argument("--models", default="resnet50,vgg19_bn", help="comma-separated (resnet50, vgg19, vgg19_bn)")
    p.add_argument("--data", default=d.data, help="dataset root (course or Kaggle layout)")
    p.add_argument("--cache-dir", default="", help="decode cache folder (default: <data>/.bfly-cache)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default=d.amp)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile)
    p.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=d.ddp,
                   help="wrap in DistributedDataParallel (a one-process group)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=d.cudnn_benchmark)
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="model mode: also time torchvision's model and print ours / theirs")
    p.add_argument("--e2e-pil", action="store_true", help="e2e mode: also train through the PIL path")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps (per round)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--workers", type=int, default=available_cores(), help="PIL path DataLoader workers")
    p.add_argument("--host-images", type=int, default=256, help="host mode: images timed")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: known GPUs)")
    p.add_argument("--json", default="runs/bench/bench.json", help="write the rows here ('' = do not write)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(batch_size=args.batch_size, image_size=args.image_size, amp=args.amp,
                    channels_last=args.channels_last, compile=args.compile, ddp=args.ddp, steps=args.steps,
                    warmup=args.warmup, rounds=args.rounds, data=args.data, cache_dir=args.cache_dir,
                    workers=args.workers, cudnn_benchmark=args.cudnn_benchmark, peak_tflops=args.peak_tflops)


def modes_of(text: str, device: torch.device) -> list[str]:
    if text == "auto":
        return ["host"] if device.type == "cpu" else ["host", "model", "input", "e2e"]
    modes = ["host", "model", "input", "e2e"] if text == "all" else text.split(",")
    unknown = sorted(set(modes) - {"host", "model", "input", "e2e"})
    if unknown:
        raise SystemExit(f"bfly.bench: unknown mode(s) {unknown}; use host, input, model, e2e, all or auto")
    return modes


def run(args: argparse.Namespace) -> list[Row]:
    device, s = default_device(), settings_from(args)
    torch.backends.cudnn.benchmark = s.cudnn_benchmark
    rows: list[Row] = []
    for mode in modes_of(args.mode, device):
        if mode == "host":
            rows += guarded("host", "host CPU per image", s.tag(), lambda: bench_host(s, device, args.host_images))
        elif mode == "input":
            rows += guarded("input", "input only", s.tag(), lambda: bench_input(s, device))
        for name in args.models.split(",") if mode in ("model", "e2e") else []:
            if mode == "model":
                rows += guarded("model", name, s.tag(), lambda: bench_model(name, s, device, args.reference))
            else:
                inputs = ("cached", "pil") if args.e2e_pil else ("cached",)
                rows += guarded("e2e", name, s.tag(), lambda: bench_model(name, s, device, False, inputs))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print(f"bfly.bench on {environment()}")
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows, settings_from(args))
        print(f"rows written to {args.json}")
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
