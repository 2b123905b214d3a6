"""Reproduce the accuracy table: train each recipe on one GPU, then print one table.

    python -m bfly.compact data/butterflies data/butterflies-144 --size 144 --quality 60
    python -m bfly.reproduce --data data/butterflies-144            # ~10 min on one H100/H200
    python -m bfly.reproduce --data data/butterfly-mini --smoke      # CPU check of the whole path

Each recipe is configs/<model>.yaml with data.root, run.dir and seed set here; the test split is
evaluated every epoch only in this script (the recipes were chosen on valid). Writes
<out>/results.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from bfly.core.cli import show_defaults
from bfly.job.train import main as train_main
from bfly.run.runlog import read_metrics

REPO = Path(__file__).resolve().parents[2]
MODELS = ("resnet50", "vgg19_bn", "vgg19")
# CPU smoke: the whole path (config, data, training, test evaluation, table) in a minute or two.
SMOKE = [
    "data.image_size=32",
    "train.epochs=1",
    "train.batch_size=60",
    "data.input=pil",
    "data.workers=0",
    "train.amp=off",
]


def train_one(model: str, data: Path, out: Path, seed: int, extra: list[str]) -> Path:
    run_dir = out / f"{model}-seed{seed}"
    argv = [
        "--config",
        str(REPO / "configs" / f"{model}.yaml"),
        f"data.root={data}",
        f"run.dir={run_dir}",
        f"train.seed={seed}",
        "train.eval_splits=[valid,test]",
        "run.resume=auto",
        *extra,
    ]
    print(f"== {model} seed {seed}: python -m bfly.train {' '.join(argv)}", flush=True)
    code = train_main(argv)
    if code != 0:
        raise SystemExit(f"bfly.reproduce: {model} failed with exit code {code}")
    return run_dir


def row(model: str, seed: int, run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    last = records[-1]
    seconds = sum(r["epoch_s"] for r in records)
    return {
        "model": model,
        "seed": seed,
        "test_top1": last["test_top1"],
        "test_top5": last["test_top5"],
        "valid_top1": last["valid_top1"],
        "best_valid_top1": max(r["valid_top1"] for r in records),
        "epochs": len(records),
        "train_s": seconds,
        "img_per_s": sum(r["img_per_s"] * r["epoch_s"] for r in records) / max(seconds, 1e-9),
        "first_epoch_test_ge_904": next((r["epoch"] + 1 for r in records if r["test_top1"] >= 0.904), None),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| model | test top-1 | test top-5 | valid top-1 | epochs | train s | img/s | first epoch ≥ 90.4% test "
        "| device | torch | seed |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['test_top1']:.2%} | {r['test_top5']:.2%} | {r['valid_top1']:.2%} | {r['epochs']} "
            f"| {r['train_s']:.0f} | {r['img_per_s']:.0f} | {r['first_epoch_test_ge_904'] or '-'} | {r['device']} "
            f"| {r['torch']} | {r['seed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bfly.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root (a compact copy travels best)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated recipes")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every recipe")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="run directories and the table")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole path (not a result)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every recipe")
    args = show_defaults(parser).parse_args(argv)
    extra = (SMOKE if args.smoke else []) + args.overrides
    rows = []
    for model in args.models.split(","):
        run_dir = train_one(model, args.data, args.out, args.seed, extra)
        rows.append(row(model, args.seed, run_dir))
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
