"""The command line of `python -m bfly.train` (also read by `python -m bfly.retry` for the run directory)."""

from __future__ import annotations

import argparse

from bfly.core.config import help_text

DESCRIPTION = "Train our VGG19 / ResNet50 on the butterfly data, on one process or many."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bfly.train",
        description=DESCRIPTION,
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="preflight: validate config and data (decode every image), print the plan, "
        "exit 0 or 2; writes nothing (bfly/job/preflight.py)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="with --check: the real run's world size (default: this launch's, or WORLD_SIZE)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before or after --config
    if args.nproc is not None and not args.check:
        parser.error("--nproc goes with --check (training takes its world size from torchrun or SLURM)")
    return args
