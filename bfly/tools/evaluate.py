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

from bfly.core import distributed
from bfly.core.cli import show_defaults
from bfly.core.data.metadata import SPLIT_NAMES
from bfly.core.env import dist_env, elastic_error_file
from bfly.core.errors import Failure, one_line, one_line_warnings, recorded
from bfly.core.stack import pick_device
from bfly.core.trained import ImageError, default_out, evaluate_checkpoint
from bfly.job.exits import EXIT_USER_ERROR, USER_ERRORS


def format_result(r: dict[str, Any], world_size: int) -> str:
    width = max(len(c["species"]) for c in r["per_class"])
    lines = [
        f"{r['checkpoint']} ({r['arch']}) on the {r['split']} split of {r['data_root']}: {r['count']} images, "
        f"{world_size} process(es)",
        f"top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  loss {r['loss']:.4f}",
        "per-class top-1:",
    ]
    lines += [
        f"  {c['class_id']:>3} {c['species']:<{width}}  {c['accuracy']:7.2%}  ({c['correct']}/{c['count']})"
        for c in r["per_class"]
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bfly.evaluate",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a bfly run")
    p.add_argument("--split", default="test", choices=SPLIT_NAMES)
    p.add_argument("--data-root", help="dataset folder (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=int, default=0, help="per-process batch (default: training's eval batch)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: training's)")
    p.add_argument("--out", help="JSON result file (default: next to the checkpoint)")
    return show_defaults(p).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Under torchrun the failure is also written where its summary of a failed job reads it.
    return recorded(lambda: _evaluate(parse_args(argv)), elastic_error_file())


def _evaluate(args: argparse.Namespace) -> tuple[int, Failure | None]:
    """Exit status and, when it is not 0, why."""
    env = dist_env()
    try:
        device = pick_device(env.local_rank, env.local_world_size)
        distributed.init(env, device, "auto", 600)
        result = evaluate_checkpoint(
            args.checkpoint, args.split, env, device, args.data_root, args.batch_size, args.workers
        )
        if env.is_main:
            print(format_result(result, env.world_size))
            out = Path(args.out) if args.out else default_out(args.checkpoint, args.split)
            try:
                out.write_text(json.dumps(result, indent=1) + "\n")
            except OSError as e:
                line = f"bfly.evaluate: error: cannot write the result to {out}: {e.strerror or e}"
                print(line, file=sys.stderr, flush=True)
                return EXIT_USER_ERROR, Failure(line)
            print(f"saved to {out}")
        return 0, None
    except USER_ERRORS as e:
        # Start-up errors are the same on every rank: rank 0 reports them. A bad image is reported by
        # the rank that met it.
        per_rank = isinstance(e, ImageError)
        tag = f" [rank {env.rank}]" if per_rank and env.distributed else ""
        line = f"bfly.evaluate: error{tag}: {one_line(e)}"
        if env.is_main or per_rank:
            print(line, file=sys.stderr, flush=True)
        return EXIT_USER_ERROR, Failure(line)
    except RuntimeError as e:
        if not distributed.active():
            raise
        # A collective failed: almost always another rank met a bad image and printed it.
        line = (
            f"bfly.evaluate [rank {env.rank}]: stopping, a collective failed ({one_line(e)[:200]}); "
            "the failing rank's error is printed above"
        )
        print(line, file=sys.stderr, flush=True)
        return 1, Failure(line, follows=True)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    one_line_warnings()
    sys.exit(main())
