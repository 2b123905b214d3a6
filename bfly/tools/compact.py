"""Write a compact copy of a dataset: every image resized to SIZE x SIZE and re-encoded as JPEG.

    python -m bfly.compact data/butterflies data/compact --size 120 --quality 60

A small dataset to ship to a GPU node quickly (for `bfly.gpu_check`): the full dataset (13,594
images, 362 MB at 224 px) becomes 39.8 MiB at 120 px / quality 60, 36.8 MiB as a .tar.gz. The copy
keeps the same relative paths and writes the Kaggle-layout CSV, so it loads like the original.
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from bfly.core.cli import show_defaults
from bfly.core.data.metadata import DataError, load_metadata
from bfly.core.data.pil_input import open_rgb
from bfly.core.errors import one_line_warnings

CSV_NAME = "butterflies and moths.csv"


def _convert(job: tuple[str, str, int, int]) -> int:
    src, dst, size, quality = job
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    # optimize: Huffman tables fitted to each image, about 10% fewer bytes for the same pixels.
    open_rgb(src).resize((size, size), Image.Resampling.BICUBIC).save(dst, "JPEG", quality=quality, optimize=True)
    return Path(dst).stat().st_size


def compact(src_root: Path, dst_root: Path, size: int, quality: int, workers: int) -> tuple[int, int]:
    meta = load_metadata(src_root)
    rows, jobs = [], []
    for split in meta.splits.values():
        for path, label in zip(split.paths, split.labels):
            rel = Path(path).relative_to(meta.root.resolve()) if Path(path).is_absolute() else Path(path)
            rows.append([label, rel.as_posix(), meta.class_names[label], split.name])
            jobs.append((path, str(dst_root / rel), size, quality))
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(_convert, jobs, chunksize=64))
    with open(dst_root / CSV_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class id", "filepaths", "labels", "data set"])
        writer.writerows(rows)
    return len(jobs), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bfly.compact", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="the dataset (any layout)")
    parser.add_argument("dst", type=Path, help="the compact copy, same layout and CSVs")
    parser.add_argument("--size", type=int, default=144, help="side of every image in pixels")
    parser.add_argument("--quality", type=int, default=60, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=4, help="processes that re-encode")
    args = show_defaults(parser).parse_args(argv)
    try:
        n, total = compact(args.src, args.dst, args.size, args.quality, args.workers)
    except DataError as e:
        print(f"bfly.compact: error: {e}", file=sys.stderr)
        return 2
    print(f"{n} images -> {args.dst} ({total / 2**20:.1f} MB at {args.size} px, JPEG quality {args.quality})")
    return 0


if __name__ == "__main__":
    one_line_warnings()
    sys.exit(main())
