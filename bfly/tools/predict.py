"""Name the species in photos with a trained checkpoint: the top-5 species and their probabilities.

    python -m bfly.predict --checkpoint runs/resnet50/best.pt photo1.jpg photo2.png

Any size and mode (grayscale, palette, RGBA, CMYK) is accepted: images are turned upright by their
EXIF orientation tag (phone photos), converted and resized exactly as the evaluation transform does
in training. A file that cannot be read as an image gets an error line on stderr and the others are
still answered (exit status 1 when any failed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from bfly.core.cli import show_defaults
from bfly.core.data.metadata import DataError
from bfly.core.data.pil_input import open_rgb
from bfly.core.errors import one_line, one_line_warnings
from bfly.core.stack import configure_backends, pick_device
from bfly.core.trained import BATCH, class_probs, load_trained
from bfly.job.exits import EXIT_USER_ERROR, USER_ERRORS


def format_top(path: str, probs: torch.Tensor, class_names: Sequence[str], k: int) -> str:
    p, idx = probs.topk(min(k, len(class_names)))
    width = max(len(class_names[i]) for i in idx.tolist())
    rows = [
        f"  {rank}. {class_names[i]:<{width}}  {q:6.2%}" for rank, (q, i) in enumerate(zip(p.tolist(), idx.tolist()), 1)
    ]
    return "\n".join([path, *rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bfly.predict",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a bfly run")
    p.add_argument("--top", type=int, default=5, help="how many species to list per image")
    p.add_argument("images", nargs="+", metavar="IMG")
    return show_defaults(p).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 1:
        print(f"bfly.predict: error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        saved, cfg, model = load_trained(args.checkpoint)
    except USER_ERRORS as e:
        print(f"bfly.predict: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    device = pick_device()
    configure_backends(cfg, device)
    model = model.to(device)
    failed = 0
    for i in range(0, len(args.images), BATCH):  # a batch at a time: any number of files
        images, paths = [], []
        for path in args.images[i : i + BATCH]:
            try:
                images.append(open_rgb(path))
                paths.append(path)
            except DataError as e:
                print(f"bfly.predict: error: {e}", file=sys.stderr, flush=True)
                failed += 1
        if images:
            for path, p in zip(paths, class_probs(model, images, cfg.data.image_size, device)):
                print(format_top(path, p, saved["class_names"], args.top), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    one_line_warnings()
    sys.exit(main())
