"""Hand a trained model over: weights and a program that load without bfly, checked against the checkpoint.

    python -m bfly.export --checkpoint runs/resnet50/best.pt --out model/
    python -m bfly.export --checkpoint runs/resnet50/best.pt --out model/ --data data/butterflies --images 32

Writes into --out:
  model.safetensors  the weights (the EMA's when the run kept one) under torchvision's key names: they load
                     with strict=True into torchvision.models.<arch>(num_classes=N) (resnet_tiny has no
                     torchvision twin: its weights load into bfly's own model or through model.pt2)
  model.pt2          a torch.export program (batch size free): torch.export.load(path).module()(images)
  model.onnx         only when the onnx package (and the exporter's onnxscript) is installed
  model.json         arch, class names, the eval transform's parameters (size, mean, std, ...), and the check
Then it checks each form: the logits of real images of the dataset (the checkpoint's data.root, or --data)
through each exported form equal the checkpoint model's within the tolerance it prints. Exit 0, 1 when a
form differs, 2 on a user error (checkpoint, data).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bfly.core.cli import show_defaults
from bfly.core.config import ConfigError
from bfly.core.data.metadata import load_metadata
from bfly.core.data.pil_input import open_rgb
from bfly.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from bfly.core.errors import one_line
from bfly.core.trained import load_trained
from bfly.job.exits import EXIT_USER_ERROR, USER_ERRORS

# The exported forms run the same float32 operations as the checkpoint's model on the CPU; they may
# differ only by the order of floating-point sums: |logit difference| <= RTOL * max(1, max |logit|).
RTOL = 1e-4
WEIGHTS, PROGRAM, ONNX, INFO = "model.safetensors", "model.pt2", "model.onnx", "model.json"


def tolerance(reference: torch.Tensor) -> float:
    return RTOL * max(1.0, reference.abs().max().item())


def eval_transform_info(image_size: int) -> dict[str, Any]:
    """bfly.core.data.transforms.build_eval_transform, in words and numbers another program can follow."""
    return {
        "steps": [
            "decode; apply the EXIF orientation (PIL.ImageOps.exif_transpose); convert to RGB",
            f"resize to {image_size}x{image_size} (both sides, aspect ratio not kept), bilinear, antialiased",
            "to float32 CHW in [0, 1] (pixel / 255)",
            "normalize: (x - mean) / std per channel",
        ],
        "size": [image_size, image_size],
        "interpolation": "bilinear",
        "antialias": True,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "torchvision": (
            f"transforms.Compose([transforms.Resize(({image_size}, {image_size})), transforms.ToTensor(), "
            f"transforms.Normalize({list(IMAGENET_MEAN)}, {list(IMAGENET_STD)})])"
        ),
    }


def check_images(root: str, split: str, count: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images of a split (in CSV order), through the eval transform."""
    meta = load_metadata(root, splits=[split])
    paths = list(meta.splits[split].paths)[:count]
    transform = build_eval_transform(image_size)
    return torch.stack([transform(open_rgb(str(p))) for p in paths]), [str(p) for p in paths]


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()  # what a user loads: the saved file, read back


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Written when onnx is installed; checked when onnxruntime is too (else None)."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime  # type: ignore[import-not-found]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def _readable(path: Path) -> None:
    """safetensors creates its file for its owner only; a model to hand over is readable as umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def torchvision_builder(arch: str) -> Callable[..., nn.Module] | None:
    """torchvision's model of that name (resnet50, vgg19, vgg19_bn); None for ours alone (resnet_tiny)."""
    import torchvision

    return getattr(torchvision.models, arch, None)


def torchvision_model(builder: Callable[..., nn.Module], num_classes: int, weights: Path) -> nn.Module:
    """torchvision's own model, loaded strictly from the exported weights: proves the key names fit."""
    from safetensors.torch import load_file

    model = builder(weights=None, num_classes=num_classes)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def compare(
    forms: dict[str, Callable[[torch.Tensor], torch.Tensor] | None], images: torch.Tensor, reference: torch.Tensor
) -> dict[str, float | None]:
    """Each form's largest logit difference from the model's own on `images` (None: written, not checked)."""
    checks: dict[str, float | None] = {}
    for name, run in forms.items():
        if run is None:
            checks[name] = None  # written, not checked: onnxruntime is not installed
            continue
        with torch.no_grad():
            checks[name] = (run(images).float() - reference).abs().max().item()
    return checks


def export(checkpoint: Path, out: Path, data_root: str | None, split: str, count: int) -> tuple[dict[str, Any], bool]:
    """Writes the forms and checks them; returns model.json's content and whether every form matched."""
    from safetensors.torch import save_file

    saved, cfg, model = load_trained(checkpoint)
    size = cfg.data.image_size
    images, paths = check_images(data_root or cfg.data.root, split, count, size)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / WEIGHTS), metadata={"arch": saved["arch"], "num_classes": str(saved["num_classes"])})
    _readable(out / WEIGHTS)
    with torch.no_grad():
        reference = model(images)
    example = images[:1].repeat(2, 1, 1, 1)  # a batch of 2: a batch of 1 would fix the program's batch size
    forms: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {}
    builder = torchvision_builder(saved["arch"])
    if builder is not None:
        name = f"{WEIGHTS} in torchvision.models.{saved['arch']} (strict load)"
        forms[name] = torchvision_model(builder, saved["num_classes"], out / WEIGHTS)
    forms[f"{PROGRAM} (torch.export)"] = export_program(model, example, out / PROGRAM)
    if importlib.util.find_spec("onnx") is not None:
        forms[f"{ONNX} (onnxruntime)"] = export_onnx(model, example, out / ONNX)
    tol = tolerance(reference)
    checks = compare(forms, images, reference)
    ok = all(diff <= tol for diff in checks.values() if diff is not None)
    info = {
        "arch": saved["arch"],
        "num_classes": saved["num_classes"],
        "class_names": list(saved["class_names"]),
        "torchvision_builder": (
            f"torchvision.models.{saved['arch']}(num_classes={saved['num_classes']})" if builder is not None else None
        ),
        "eval_transform": eval_transform_info(size),
        "input": "float32 tensor (N, 3, H, W), the eval transform's output; output: logits (N, num_classes)",
        "files": sorted(p.name for p in out.iterdir() if p.name in (WEIGHTS, PROGRAM, ONNX)),
        "checkpoint": {
            "path": str(Path(checkpoint).resolve()),
            "epoch": saved.get("epoch"),
            "global_step": saved.get("global_step"),
            "ema": bool(saved.get("ema")),
            "metrics": {k: v for k, v in (saved.get("metrics") or {}).items() if isinstance(v, (int, float))},
        },
        "check": {
            "images": len(paths),
            "split": split,
            "first_image": paths[0],
            "tolerance": tol,
            "rule": f"max |logit difference| <= {RTOL} * max(1, max |logit|)",
            "max_abs_diff": checks,
        },
    }
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info, ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bfly.export",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="best.pt (or last.pt, epoch-*.pt) of a bfly run")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--data", help="dataset of the check images (default: the checkpoint's data.root)")
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"), help="split of the check images")
    p.add_argument("--images", type=int, default=16, help="how many images the check runs (default: 16)")
    args = show_defaults(p).parse_args(argv)
    if args.images < 1:
        p.error("--images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info, ok = export(args.checkpoint, args.out, args.data, args.split, args.images)
    except (*USER_ERRORS, ConfigError) as e:
        print(f"bfly.export: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    check = info["check"]
    print(
        f"exported {info['arch']} ({info['num_classes']} classes) from {args.checkpoint} to {args.out}: "
        f"{', '.join(info['files'] + [INFO])}"
    )
    print(f"check on {check['images']} {check['split']} images: {check['rule']} = {check['tolerance']:.2e}")
    for name, diff in check["max_abs_diff"].items():
        verdict = (
            "not checked (onnxruntime not installed)"
            if diff is None
            else (f"max |diff| {diff:.2e} " + ("ok" if diff <= check["tolerance"] else "DIFFERS"))
        )
        print(f"  {name}: {verdict}")
    if info["torchvision_builder"] is None:
        print(f"  {WEIGHTS}: not checked in torchvision (torchvision has no {info['arch']})")
    if importlib.util.find_spec("onnx") is None:
        print(f"  {ONNX}: not written (pip install onnx onnxscript onnxruntime to add it)")
    if not ok:
        print("bfly.export: error: an exported form does not give the checkpoint's logits", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
