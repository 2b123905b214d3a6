"""Evaluate a trained checkpoint on one split: top-1, top-5, loss and per-class accuracy.

    python -m bfly.evaluate --checkpoint runs/resnet50/best.pt --split test
    torchrun --nproc_per_node=4 -m bfly.evaluate --checkpoint runs/resnet50/best.pt --split test
    python -m bfly.evaluate --checkpoint best.pt --split valid --data-root /data/butterflies

The dataset may be in either CSV layout. Under torchrun every process evaluates its own exact shard
(every image once, as in training) and the counts are summed. Rank 0 prints the result and saves it
as JSON, by default next to the checkpoint as <checkpoint name>-eval-<split>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bfly import checkpoint as ckpt
from bfly import distributed
from bfly.config import Config, ConfigError, from_dict
from bfly.data.inputs import build_eval_input
from bfly.data.metadata import SPLIT_NAMES, DataError, DatasetMeta, load_metadata
from bfly.engine import evaluate
from bfly.env import DistEnv, dist_env
from bfly.models import MODEL_NAMES, build_model

USER_ERRORS = (ckpt.CheckpointError, ConfigError, DataError, ValueError)


class ImageError(DataError):
    """An image of the split cannot be read: met by the one rank whose shard holds it."""


# --- loading a trained model (shared with bfly.predict and bfly.report) ----------------------------

def load_trained(path: str | Path) -> tuple[dict[str, Any], Config, nn.Module]:
    """The checkpoint, its training config and its model (on CPU, eval mode) with the weights that
    training evaluated: the EMA weights when the run kept an EMA."""
    saved = ckpt.load(path)
    for key in ("arch", "num_classes", "class_names", "config", "model"):
        if key not in saved:
            raise ckpt.CheckpointError(f"{path}: not a bfly checkpoint (no {key!r} entry)")
    try:
        cfg = from_dict(saved["config"])
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{path}: its saved config is not valid here ({e})") from None
    if saved["arch"] not in MODEL_NAMES:
        raise ckpt.CheckpointError(
            f"{path}: checkpoint is a {saved['arch']!r} model; bfly builds {', '.join(MODEL_NAMES)}")
    model = build_model(saved["arch"], saved["num_classes"])
    weights = saved.get("ema") or saved["model"]
    check_weights_fit(model, weights, path, saved["arch"], saved["num_classes"])
    model.load_state_dict(weights)
    return saved, cfg, model.eval()


def check_weights_fit(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path, arch: str,
                      num_classes: int) -> None:
    """One clear line instead of load_state_dict's list of every missing key."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    misshaped = [k for k in expected if k in weights and expected[k].shape != weights[k].shape]
    if not (missing or unexpected or misshaped):
        return
    example = (f"e.g. {misshaped[0]} is {list(weights[misshaped[0]].shape)} in the checkpoint, "
               f"{list(expected[misshaped[0]].shape)} in the model" if misshaped
               else f"e.g. {(missing or unexpected)[0]!r}")
    raise ckpt.CheckpointError(
        f"{path}: its weights do not fit a {arch} with {num_classes} classes ({len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors; {example}): "
        "a checkpoint of another model or class count")


def check_classes(saved: dict[str, Any], path: str | Path, meta: DatasetMeta) -> None:
    ckpt.check_compatible(saved, path, saved["arch"], meta.num_classes)
    for i, (ours, theirs) in enumerate(zip(saved["class_names"], meta.class_names)):
        if ours != theirs:
            raise ckpt.CheckpointError(
                f"{path}: class id {i} is {ours!r} in the checkpoint but {theirs!r} in {meta.root}: "
                "the dataset labels its species differently from the one the model was trained on")


# --- evaluation -------------------------------------------------------------------------------------

def amp_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    # As bfly.train: auto = bf16 on CUDA, fp32 on CPU.
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def evaluate_checkpoint(path: str | Path, split: str, env: DistEnv, device: torch.device,
                        data_root: str | None = None, batch_size: int = 0,
                        workers: int | None = None) -> dict[str, Any]:
    """Collective under torchrun (the process group must be up). Returns the result on every rank."""
    saved, cfg, model = load_trained(path)
    if data_root:
        cfg.data.root = data_root
    if workers is not None:
        cfg.data.workers = workers
    meta = load_metadata(cfg.data.root, splits=[split])
    check_classes(saved, path, meta)
    channels_last = device.type == "cuda" and cfg.model.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Training's eval batch by default, so the numbers match training's to the last image.
    bs = batch_size or cfg.train.eval_batch_size or cfg.train.micro_batch_size or max(
        cfg.train.batch_size // env.world_size, 1)
    eval_input = build_eval_input(cfg, meta, split, env.rank, env.world_size, bs, device)
    try:
        m = evaluate(model, eval_input.batches(), meta.num_classes, device, amp_dtype_for(cfg, device),
                     channels_last)
    except DataError as e:
        raise ImageError(one_line(e)) from None
    confusion = m["confusion"]
    per_class = [
        {"class_id": i, "species": name, "accuracy": m["per_class"][i],
         "correct": int(confusion[i, i]), "count": int(confusion[i].sum())}
        for i, name in enumerate(meta.class_names)
    ]
    return {
        "checkpoint": str(Path(path).resolve()), "arch": saved["arch"], "epoch": saved.get("epoch"),
        "split": split, "data_root": str(meta.root), "layout": meta.layout, "count": m["count"],
        "top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "per_class": per_class,
        "class_names": list(meta.class_names), "confusion": confusion.tolist(),
    }


def default_out(path: str | Path, split: str) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}-eval-{split}.json")


def format_result(r: dict[str, Any], world_size: int) -> str:
    width = max(len(c["species"]) for c in r["per_class"])
    lines = [
        f"{r['checkpoint']} ({r['arch']}) on the {r['split']} split of {r['data_root']}: {r['count']} images, "
        f"{world_size} process(es)",
        f"top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  loss {r['loss']:.4f}",
        "per-class top-1:",
    ]
    lines += [f"  {c['class_id']:>3} {c['species']:<{width}}  {c['accuracy']:7.2%}  ({c['correct']}/{c['count']})"
              for c in r["per_class"]]
    return "\n".join(lines)


def one_line(e: BaseException) -> str:
    # A DataLoader worker's error arrives with the worker's traceback in its message: keep the cause.
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.split("Error: ", 1)[1] if last.startswith("bfly.") and "Error: " in last else last


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bfly.evaluate", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a bfly run")
    p.add_argument("--split", default="test", choices=SPLIT_NAMES)
    p.add_argument("--data-root", help="dataset folder (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=int, default=0, help="per-process batch (default: training's eval batch)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: training's)")
    p.add_argument("--out", help="JSON result file (default: next to the checkpoint)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = dist_env()
    try:
        device = distributed.pick_device(env)
        distributed.init(env, device, "auto", 600)
        result = evaluate_checkpoint(args.checkpoint, args.split, env, device, args.data_root,
                                     args.batch_size, args.workers)
        if env.is_main:
            print(format_result(result, env.world_size))
            out = Path(args.out) if args.out else default_out(args.checkpoint, args.split)
            try:
                out.write_text(json.dumps(result, indent=1) + "\n")
            except OSError as e:
                raise ValueError(f"cannot write the result to {out}: {e.strerror or e}") from None
            print(f"saved to {out}")
        return 0
    except USER_ERRORS as e:
        # Start-up errors are the same on every rank: rank 0 reports them. A bad image is reported by
        # the rank that met it.
        per_rank = isinstance(e, ImageError)
        if env.is_main or per_rank:
            tag = f" [rank {env.rank}]" if per_rank and env.distributed else ""
            print(f"bfly.evaluate: error{tag}: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not distributed.active():
            raise
        # A collective failed: almost always another rank met a bad image and printed it.
        print(f"bfly.evaluate [rank {env.rank}]: stopping, a collective failed ({one_line(e)[:200]}); "
              "the failing rank's error is printed above", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
