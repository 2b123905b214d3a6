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
import sys
from functools import partial

import torch

from bfly.core.cli import show_defaults
from bfly.core.data.decode_cache import available_cores
from bfly.core.models import MODEL_NAMES
from bfly.core.stack import pick_device
from bfly.tools.throughput import (
    Row,
    Settings,
    bench_host,
    bench_input,
    bench_model,
    environment,
    format_table,
    guarded,
    write_json,
)

# --- command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bfly.bench",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings()
    p.add_argument("--mode", default="auto", help="host,input,model,e2e, all or auto (default: auto)")
    p.add_argument("--models", default="resnet50,vgg19_bn", help=f"comma-separated ({', '.join(MODEL_NAMES)})")
    p.add_argument("--data", default=d.data, help="dataset root (course or Kaggle layout)")
    p.add_argument("--cache-dir", default="", help="decode cache folder (default: <data>/.bfly-cache)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default=d.amp)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile)
    p.add_argument(
        "--ddp",
        action=argparse.BooleanOptionalAction,
        default=d.ddp,
        help="wrap in DistributedDataParallel (a one-process group)",
    )
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=d.cudnn_benchmark)
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model mode: also time torchvision's model and print ours / theirs",
    )
    p.add_argument("--e2e-pil", action="store_true", help="e2e mode: also train through the PIL path")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps (per round)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--workers", type=int, default=available_cores(), help="PIL path DataLoader workers")
    p.add_argument("--host-images", type=int, default=256, help="host mode: images timed")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: known GPUs)")
    p.add_argument("--json", default="runs/bench/bench.json", help="write the rows here ('' = do not write)")
    return show_defaults(p).parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        batch_size=args.batch_size,
        image_size=args.image_size,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        ddp=args.ddp,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        data=args.data,
        cache_dir=args.cache_dir,
        workers=args.workers,
        cudnn_benchmark=args.cudnn_benchmark,
        peak_tflops=args.peak_tflops,
    )


def modes_of(text: str, device: torch.device) -> list[str]:
    if text == "auto":
        return ["host"] if device.type == "cpu" else ["host", "model", "input", "e2e"]
    modes = ["host", "model", "input", "e2e"] if text == "all" else text.split(",")
    unknown = sorted(set(modes) - {"host", "model", "input", "e2e"})
    if unknown:
        raise SystemExit(f"bfly.bench: unknown mode(s) {unknown}; use host, input, model, e2e, all or auto")
    return modes


def run(args: argparse.Namespace) -> list[Row]:
    device, s = pick_device(), settings_from(args)
    rows: list[Row] = []
    for mode in modes_of(args.mode, device):
        if mode == "host":
            rows += guarded("host", "host CPU per image", s.tag(), partial(bench_host, s, device, args.host_images))
        elif mode == "input":
            rows += guarded("input", "input only", s.tag(), partial(bench_input, s, device))
        for name in args.models.split(",") if mode in ("model", "e2e") else []:
            if mode == "model":
                rows += guarded("model", name, s.tag(), partial(bench_model, name, s, device, args.reference))
            else:
                inputs = ("cached", "pil") if args.e2e_pil else ("cached",)
                rows += guarded("e2e", name, s.tag(), partial(bench_model, name, s, device, False, inputs))
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
