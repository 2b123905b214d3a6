"""A trained model from a checkpoint: loaded, evaluated on a split, its class probabilities. The library
under the commands bfly.evaluate, bfly.predict and bfly.report (and the wandb sample images)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from bfly.core import checkpoint as ckpt, stack
from bfly.core.config import Config, ConfigError, from_dict, replace
from bfly.core.data.inputs import build_eval_input
from bfly.core.data.metadata import DataError, load_metadata
from bfly.core.data.transforms import build_eval_transform
from bfly.core.engine import evaluate
from bfly.core.env import DistEnv
from bfly.core.errors import one_line, release_frames
from bfly.core.models import MODEL_NAMES, build_model


class ImageError(DataError):
    """An image of the split cannot be read: met by the one rank whose shard holds it."""


BATCH = 32  # images per forward pass in class_probs


def load_trained(path: str | Path) -> tuple[dict[str, Any], Config, nn.Module]:
    """The checkpoint, its training config and its model (on CPU, eval mode) with the weights that
    training evaluated: the EMA weights when the run kept an EMA."""
    saved = ckpt.load(path)
    ckpt.check_trained(saved, path, MODEL_NAMES)
    try:
        cfg = from_dict(saved["config"])
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{path}: its saved config is not valid here ({e})") from None
    model = build_model(saved["arch"], saved["num_classes"])
    weights = saved.get("ema") or saved["model"]
    check_weights_fit(model, weights, path, saved["arch"], saved["num_classes"])
    model.load_state_dict(weights)
    return saved, cfg, model.eval()


def check_weights_fit(
    model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path, arch: str, num_classes: int
) -> None:
    """One clear line instead of load_state_dict's list of every missing key."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    misshaped = [k for k in expected if k in weights and expected[k].shape != weights[k].shape]
    if not (missing or unexpected or misshaped):
        return
    example = (
        f"e.g. {misshaped[0]} is {list(weights[misshaped[0]].shape)} in the checkpoint, "
        f"{list(expected[misshaped[0]].shape)} in the model"
        if misshaped
        else f"e.g. {(missing or unexpected)[0]!r}"
    )
    raise ckpt.CheckpointError(
        f"{path}: its weights do not fit a {arch} with {num_classes} classes ({len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors; {example}): "
        "a checkpoint of another model or class count"
    )


@torch.no_grad()
def class_probs(model: nn.Module, images: Sequence[Image.Image], image_size: int, device: torch.device) -> torch.Tensor:
    """Softmax over the classes, (N, C) on CPU, for RGB images of any size."""
    transform = build_eval_transform(image_size)
    model.eval()
    out = []
    for i in range(0, len(images), BATCH):
        x = torch.stack([transform(im) for im in images[i : i + BATCH]]).to(device)
        out.append(model(x).float().softmax(1).cpu())
    return torch.cat(out)


def evaluate_checkpoint(
    path: str | Path,
    split: str,
    env: DistEnv,
    device: torch.device,
    data_root: str | None = None,
    batch_size: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Collective under torchrun (the process group must be up). Returns the result on every rank."""
    saved, cfg, model = load_trained(path)
    changes: dict[str, Any] = {"data.root": data_root} if data_root else {}
    if workers is not None:
        changes["data.workers"] = workers
    cfg = replace(cfg, changes)
    meta = load_metadata(cfg.data.root, splits=[split])
    ckpt.check_classes(saved, path, list(meta.class_names), meta.root)
    stack.configure_backends(cfg, device)  # training's kernels: its evaluation's numbers
    model = stack.place_model(model, cfg, device)
    # Training's eval batch by default, so the numbers match training's to the last image.
    bs = batch_size or stack.eval_batch_size(cfg, env.world_size)
    eval_input = build_eval_input(cfg, meta, split, env.rank, env.world_size, bs, device)
    try:
        m = evaluate(
            model,
            eval_input.batches(),
            meta.num_classes,
            device,
            stack.amp_policy(cfg.train.amp, device).dtype,
            cfg.model.channels_last,
        )
    except DataError as e:
        release_frames(e)
        raise ImageError(one_line(e)) from None
    confusion = m["confusion"]
    per_class = [
        {
            "class_id": i,
            "species": name,
            "accuracy": m["per_class"][i],
            "correct": int(confusion[i, i]),
            "count": int(confusion[i].sum()),
        }
        for i, name in enumerate(meta.class_names)
    ]
    return {
        "checkpoint": str(Path(path).resolve()),
        "arch": saved["arch"],
        "epoch": saved.get("epoch"),
        "split": split,
        "data_root": str(meta.root),
        "layout": meta.layout,
        "count": m["count"],
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
        "per_class": per_class,
        "class_names": list(meta.class_names),
        "confusion": confusion.tolist(),
    }


def default_out(path: str | Path, split: str) -> Path:
    """Where an evaluation of checkpoint `path` on `split` is saved: next to it."""
    path = Path(path)
    return path.with_name(f"{path.stem}-eval-{split}.json")
