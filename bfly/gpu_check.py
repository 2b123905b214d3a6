"""The GPU check: the speed matrix on one GPU, in under 8 minutes, as one table.

    python -m bfly.gpu_check --data /path/to/butterflies      # the full dataset (either CSV layout)
    python -m bfly.gpu_check                                  # no data: synthetic-input cells only
    python -m bfly.gpu_check --no-compile --json gpu.json

Cells run in order of importance, each guarded: a failure is a row of the table, not the end of the
run. A cell whose estimated cost (seconds on an H200, from the issue's reference figures) would
overrun --budget-s is skipped and says so. Needs neither wandb nor submitit.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from bfly import bench
from bfly.bench import Row, Settings
from bfly.data.cached_input import ResidentSplit
from bfly.data.decode_cache import available_cores
from bfly.data.metadata import load_metadata

Cell = tuple[str, float, Callable[[], list[Row]]]  # (name, estimated seconds, run)


def cells(s: Settings, device: torch.device, data: bool, compile_cells: bool) -> list[Cell]:
    compiled = replace(s, compile=True)
    store: dict[str, ResidentSplit] = {}

    def resident() -> ResidentSplit:  # decoded and copied to the GPU once, shared by every cell
        if "train" not in store:
            start = time.perf_counter()
            cfg = bench.data_config(s, input="cached")
            store["train"] = ResidentSplit(bench.train_split(s), cfg.data, device)
            store["seconds"] = time.perf_counter() - start
        return store["train"]

    def cache_row() -> list[Row]:
        split = resident()
        return [Row("cache", "decode cache: open (build on first use) + to GPU", f"{s.image_size}px",
                    img_s=len(split) / store["seconds"], note=f"{len(split)} images, {split.placement} memory, "
                    f"{split.images.numel() / 2**30:.2f} GB")]

    out: list[Cell] = []
    if data:
        out += [("decode cache", 40, cache_row),
                ("host CPU per image", 20, lambda: bench.bench_host(s, device, images=256))]
    out += [("resnet50 eager", 30, lambda: bench.bench_model(
                "resnet50", s, device, True, ("cached", "pil") if data else (), resident() if data else None)),
            ("vgg19_bn eager", 50, lambda: bench.bench_model(
                "vgg19_bn", s, device, True, ("cached",) if data else (), resident() if data else None))]
    if data:
        out.append(("input only", 20, lambda: bench.bench_input(s, device, resident())))
    out.append(("resnet50 eager, DDP wrapper", 15,
                lambda: bench.bench_model("resnet50", replace(s, ddp=True, rounds=1), device, False)))
    if compile_cells:
        out += [("resnet50 compiled", 150, lambda: bench.bench_model(
                    "resnet50", compiled, device, True, ("cached",) if data else (), resident() if data else None)),
                ("vgg19_bn compiled", 120, lambda: bench.bench_model(
                    "vgg19_bn", compiled, device, True, ("cached",) if data else (), resident() if data else None))]
    return out


def run_cells(planned: list[Cell], budget_s: float, settings: str) -> list[Row]:
    start, rows = time.perf_counter(), []
    for name, estimate, fn in planned:
        elapsed = time.perf_counter() - start
        if elapsed + estimate > budget_s:
            rows.append(Row("skip", name, settings, note=f"skipped: {elapsed:.0f}s + ~{estimate:.0f}s estimated "
                                                          f"> budget {budget_s:.0f}s"))
            continue
        print(f"bfly.gpu_check: {name} (at {elapsed:.0f}s)", file=sys.stderr, flush=True)
        t = time.perf_counter()
        cell_rows = bench.guarded("cell", name, settings, fn)
        for r in cell_rows:
            r.extra["cell_s"] = round(time.perf_counter() - t, 1)
        rows += cell_rows
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bfly.gpu_check", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="dataset root; without it only synthetic-input cells run")
    p.add_argument("--cache-dir", default="", help="decode cache folder (default: <data>/.bfly-cache)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=available_cores(), help="PIL path DataLoader workers")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include the torch.compile cells (the longest: ~4-5 min of compilation)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip cells that would end later than this")
    p.add_argument("--json", default="runs/bench/gpu_check.json", help="write the rows here ('' = do not)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bfly.gpu_check: no CUDA device; on a CPU use `python -m bfly.bench` (host mode)", file=sys.stderr)
        return 2
    data = bool(args.data)
    if data:
        load_metadata(args.data, splits=("train",))  # a wrong --data fails now, with the CSV's name
    s = Settings(batch_size=args.batch_size, image_size=args.image_size, steps=args.steps, warmup=args.warmup,
                 data=args.data or Settings.data, cache_dir=args.cache_dir, workers=args.workers)
    torch.backends.cudnn.benchmark = s.cudnn_benchmark
    device = bench.default_device()
    start = time.perf_counter()
    rows = run_cells(cells(s, device, data, args.compile), args.budget_s, s.tag())
    print(f"\nbfly.gpu_check on {bench.environment()}, {time.perf_counter() - start:.0f}s"
          f"{'' if data else ' (no --data: synthetic input only)'}")
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(args.json, rows, s)
        print(f"rows written to {Path(args.json)}")
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
