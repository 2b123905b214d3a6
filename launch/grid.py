"""Grids of runs for `launch.submit`: `--sweep key=v1,v2` (repeatable) and `--seeds 0,1,2`.

Every combination of the swept values, the seeds and the --config files is one run. Its run directory
is named from what varies (`lr-0.05_name-resnet50_seed-0`), under `run.dir` if the command line sets
one, else under `runs/<group>`; the names are the same for the same command line, and two runs that would
share a directory are refused. Each run gets, as config overrides, the wandb group, a job type (the
setting: the varied values without the seed, which its seeds share), one tag per varied value and
`wandb.varies` (the varied keys, logged as the run's `varies` config and read by
`bfly.report --group`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from bfly.core.config import SEED_KEY

_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")  # what a file name keeps; the rest becomes "_"


class GridError(ValueError):
    pass


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: its config file, the values it sets and where it trains."""

    config: str | None
    values: dict[str, str]  # varied key -> value as written on the command line, in the grid's key order
    name: str  # run directory name
    setting: str  # the name without the seed: shared by the seeds of one setting


def split_values(text: str) -> list[str]:
    """`0.05,0.1` -> ["0.05", "0.1"]; commas inside [...] or quotes stay (`[valid,test],[valid]`)."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_sweep(text: str) -> tuple[str, list[str]]:
    key, sep, raw = text.partition("=")
    values = split_values(raw) if sep else []
    if not key.strip() or not values or "" in values:
        raise GridError(f"--sweep {text!r}: expected section.key=value1,value2,...")
    if len(set(values)) != len(values):
        raise GridError(f"--sweep {text!r}: a value is listed twice")
    return key.strip(), values


def parse_seeds(text: str) -> list[str]:
    """`0,1,2` or `0-4` (both ends included), or a mix: `0-2,7`."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise GridError(f"--seeds {text!r}: expected seeds such as 0,1,2 or 0-4")
        seeds += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    if len(set(seeds)) != len(seeds):
        raise GridError(f"--seeds {text!r}: a seed is listed twice")
    return [str(s) for s in seeds]


def axes(sweeps: list[str], seeds: str | None) -> dict[str, list[str]]:
    """varied key -> its values, in command-line order (the seeds last)."""
    out: dict[str, list[str]] = {}
    for text in sweeps:
        key, values = parse_sweep(text)
        if key in out:
            raise GridError(f"--sweep {key} is given twice: list all its values in one --sweep")
        out[key] = values
    if seeds is not None:
        if SEED_KEY in out:
            raise GridError(f"--seeds and --sweep {SEED_KEY} both set the seed: use one")
        out[SEED_KEY] = parse_seeds(seeds)
    return out


def short_names(keys: list[str]) -> dict[str, str]:
    """optim.lr -> lr, unless another varied key ends the same (then the whole key)."""
    leaves = [k.rpartition(".")[2] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}


def safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


def expand(configs: list[str | None], grid: dict[str, list[str]]) -> list[GridRun]:
    """Every (config, value combination), configs outermost; names from what varies."""
    keys = list(grid)
    short = short_names(keys)
    runs = []
    for config in configs:
        for combo in itertools.product(*grid.values()):
            values = dict(zip(keys, combo))
            parts = [f"{short[k]}-{safe(v)}" for k, v in values.items()]
            setting = [p for k, p in zip(keys, parts) if k != SEED_KEY]
            prefix = [safe(Path(config).stem)] if config and len(configs) > 1 else []
            runs.append(GridRun(config, values, "_".join(prefix + parts), "_".join(prefix + setting) or "train"))
    return runs


def default_group(configs: list[str | None], grid: dict[str, list[str]], overrides: list[str]) -> str:
    """The wandb group, and folder under runs/, of several runs submitted without --group: named from
    what varies, with a short hash of the command line's training part. The same command gives the same
    name, so submitted again its runs resume; another command gives another name."""
    words = [Path(c).stem for c in configs if c] + list(short_names(list(grid)).values())
    digest = hashlib.sha256(json.dumps([configs, grid, overrides]).encode()).hexdigest()[:8]
    return safe("-".join([*words[:6], digest]))


def run_overrides(run: GridRun, group: str, tags: list[str]) -> list[str]:
    """The overrides that make `run` one run of the grid (after the command line's own)."""
    return [
        *(f"{k}={v}" for k, v in run.values.items()),
        f"wandb.group={group}",
        f"wandb.job_type={run.setting}",
        # JSON is YAML: values with commas or brackets stay one tag each.
        f"wandb.tags={_json(tags + [tag(f'{k}={v}') for k, v in run.values.items()])}",
        f"wandb.varies={_json(list(run.values))}",
    ]


def tag(text: str) -> str:
    """wandb refuses tags over 64 characters: a longer one is cut, and says so."""
    return text if len(text) <= 64 else text[:61] + "..."


def _json(values: list[str]) -> str:
    return json.dumps(values, separators=(",", ":"))
