"""Figures and a summary table from run directories, without wandb.

    python -m bfly.report runs/vgg19 runs/resnet50                 # into report/
    python -m bfly.report runs/vgg19 runs/resnet50 --out cmp --confusion test
    python -m bfly.report --group lr-model --confusion none         # a wandb group's runs, found under runs/

Writes, from each run's metrics.jsonl:
  accuracy.png   per-epoch train and valid (and test, when logged) top-1 accuracy of every run
  loss.png       the same for the loss
  summary.md     the highest train / valid / test top-1 accuracy of each run, and the figures
and, when runs differ only by train.seed (a launch.submit grid, or --group): the mean ± std over
the seeds of each setting, as a table in summary.md and seeds.png (valid top-1 per epoch, the mean
with a band of ± one standard deviation). A setting is the values of the keys the runs' wandb.varies
names (launch.submit sets it), else of the training keys that differ between the runs.
summary.md also holds each run's attempt history (attempts.jsonl: every start, where it ran, with which
code and libraries, how it ended); `--attempts` only prints those tables. And each run's goodput: how
much of its wall clock and GPU-hours trained the model (kept steps), and where the rest went: queued,
start-up, recomputed steps, evaluation, checkpoint stall, hang detection, restart, other; per part and
per attempt (bfly/run/goodput.py says what each part is); `--goodput` only prints those tables.
And, unless --confusion none, confusion-<run>-<split>.png: the confusion matrix of the run's best.pt
on that split. It comes from <run>/best-eval-<split>.json (what `python -m bfly.evaluate` saves);
when that file is missing, best.pt is evaluated here (one process) and the file written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bfly.core.checkpoint import BEST
from bfly.core.cli import show_defaults
from bfly.core.config import SEED_KEY, flat, is_operational
from bfly.core.data.metadata import SPLIT_NAMES
from bfly.run import goodput
from bfly.run.runlog import ATTEMPTS, read_metrics

SPLITS = ("train", "valid", "test")
STYLES = {"train": "--", "valid": "-", "test": ":"}


class ReportError(ValueError):
    pass


@dataclass
class RunMetrics:
    label: str
    model: str
    run_dir: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # flat keys of config.yaml ({} without one)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["epoch"] + 1, r[key]) for r in self.records if key in r]
        return [e for e, _ in points], [v for _, v in points]

    def best(self, split: str) -> tuple[float, int] | None:
        """Highest top-1 of a split and the epoch (1-based) it was reached, or None if never logged."""
        xs, ys = self.curve(f"{split}_top1")
        if not ys:
            return None
        i = max(range(len(ys)), key=ys.__getitem__)
        return ys[i], xs[i]


def load_run(run_dir: Path) -> RunMetrics:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a bfly run directory, or no epoch finished yet)")
    try:
        records = read_metrics(run_dir)
    except (ValueError, KeyError) as e:
        raise ReportError(f"{path}: not valid JSON lines ({e})") from None
    if not records:
        raise ReportError(f"{path}: empty (no epoch finished yet)")
    config = run_config(run_dir)
    return RunMetrics(run_dir.resolve().name, str(config.get("model.name", "?")), run_dir, records, config)


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: invalid YAML ({e})") from None
    return flat(tree) if isinstance(tree, dict) else {}


def group_runs(root: Path, group: str) -> list[Path]:
    """The run directories under `root` whose config.yaml names wandb group `group` and that finished an
    epoch, sorted; the others of the group are named in a warning."""
    # A run directory has train.log next to config.yaml (wandb keeps config.yaml files of its own).
    runs = sorted(p.parent for p in root.rglob("config.yaml") if (p.parent / "train.log").is_file())
    members = [d for d in runs if run_config(d).get("wandb.group") == group]
    if not members:
        raise ReportError(f"no run of wandb group {group!r} under {root} (a config.yaml with wandb.group: {group})")
    started = [d for d in members if not (d / "metrics.jsonl").is_file()]
    if started:
        print(f"bfly.report: warning: no epoch finished yet, left out: {', '.join(map(str, started))}", file=sys.stderr)
    if len(started) == len(members):
        raise ReportError(f"no run of wandb group {group!r} under {root} has finished an epoch yet")
    return [d for d in members if d not in started]


# --- over seeds ----------------------------------------------------------------------------------------


def setting_keys(runs: list[RunMetrics]) -> list[str]:
    """What makes a setting: the keys the runs' wandb.varies names, else the training keys that differ."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.config.get("wandb.varies") or [] if k not in keys]
    if not keys:
        every = sorted({k for r in runs for k in r.config})
        keys = [k for k in every if not is_operational(k) and len({repr(r.config.get(k)) for r in runs}) > 1]
    return [k for k in keys if k != SEED_KEY]


def settings(runs: list[RunMetrics]) -> dict[str, list[RunMetrics]]:
    """setting label -> its runs (one per seed), in the order the runs come."""
    keys = setting_keys(runs)
    out: dict[str, list[RunMetrics]] = {}
    for r in runs:
        label = " ".join(f"{k}={r.config.get(k)}" for k in keys) or "all runs"
        out.setdefault(label, []).append(r)
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}%"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}%"


def _last(run: RunMetrics, key: str) -> list[float]:
    return [run.records[-1][key]] if key in run.records[-1] else []


def seeds_table(groups: dict[str, list[RunMetrics]]) -> str:
    """Mean ± sample standard deviation over each setting's runs (seeds)."""
    lines = [
        "| setting | seeds | epochs | best valid top-1 | last valid top-1 | last test top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, runs in groups.items():
        seeds = ",".join(str(r.config.get(SEED_KEY, "?")) for r in runs)
        fewest, most = min(len(r.records) for r in runs), max(len(r.records) for r in runs)
        best = [b[0] for r in runs if (b := r.best("valid"))]
        last_valid = [v for r in runs for v in _last(r, "valid_top1")]
        last_test = [v for r in runs for v in _last(r, "test_top1")]
        lines.append(
            f"| {label} | {seeds} | {fewest if fewest == most else f'{fewest}-{most}'} | {_mean_std(best)} | "
            f"{_mean_std(last_valid)} | {_mean_std(last_test)} |"
        )
    return "\n".join(lines)


def plot_seeds(groups: dict[str, list[RunMetrics]], out: Path) -> Path:
    """Valid top-1 per epoch of each setting: the mean over its seeds, a band of ± one standard deviation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for i, (label, runs) in enumerate(groups.items()):
        by_epoch: dict[int, list[float]] = {}
        for r in runs:
            for epoch, value in zip(*r.curve("valid_top1")):
                by_epoch.setdefault(epoch, []).append(100 * value)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [statistics.fmean(by_epoch[e]) for e in epochs]
        std = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
        colour = f"C{i % 10}"
        ax.plot(epochs, mean, "-", color=colour, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
        ax.fill_between(
            epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour, alpha=0.2
        )
    return _save_epoch_figure(fig, ax, "valid top-1 accuracy (%)", "Valid top-1 per epoch: mean ± std over seeds", out)


# --- figures ---------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the figures need matplotlib: pip install 'bfly[report]'") from None
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[RunMetrics], metric: str, out: Path) -> Path:
    """metric: "top1" or "loss"; one colour per run, one line style per split."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for split in SPLITS:
            xs, ys = run.curve(f"{split}_{metric}")
            if not xs:
                continue
            ys = [100 * y for y in ys] if metric == "top1" else ys
            ax.plot(xs, ys, STYLES[split], color=colour, marker="o", markersize=3, label=f"{run.label} {split}")
        best = run.best("valid") if metric == "top1" else None
        if best:  # the headline number: each model's highest valid accuracy
            ax.plot(best[1], 100 * best[0], "*", color=colour, markersize=13, markeredgecolor="black")
            ax.annotate(
                f"best valid {100 * best[0]:.1f}%",
                (best[1], 100 * best[0]),
                textcoords="offset points",
                xytext=(0, -18),
                ha="center",
                color=colour,
                fontsize=9,
                fontweight="bold",
                bbox={"boxstyle": "round", "fc": "white", "ec": colour, "alpha": 0.9},
            )
    ylabel = "top-1 accuracy (%)" if metric == "top1" else "loss"
    title = "Top-1 accuracy per epoch" if metric == "top1" else "Loss per epoch"
    return _save_epoch_figure(fig, ax, ylabel, title, out)


def _save_epoch_figure(fig: Any, ax: Any, ylabel: str, title: str, out: Path) -> Path:
    """The axes every per-epoch figure shares (epochs on x, a grid, the legend), then saved to `out`."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_confusion(result: dict[str, Any], label: str, out: Path) -> Path:
    """Rows: true species, normalized to 1 (so the diagonal is each species' accuracy)."""
    import numpy as np

    plt = _pyplot()
    counts = np.array(result["confusion"], dtype=float)
    names = result["class_names"]
    n = len(names)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    small = n <= 30  # up to about 30 species the counts fit in the cells
    side = min(max(7.0, 0.25 * n + 4), 32.0)
    font, big = (9, 11) if small else (6, 18)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    if small:
        for (r, c), v in np.ndenumerate(counts):
            if v:
                ax.text(
                    c,
                    r,
                    int(v),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if rates[r, c] > 0.5 else "black",
                )
    ax.set_xlabel("predicted species", fontsize=big)
    ax.set_ylabel("true species", fontsize=big)
    ax.set_title(
        f"{label}: {result['split']} split, top-1 {result['top1']:.2%} ({result['count']} images)", fontsize=big + 1
    )
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("fraction of the true species", fontsize=big)
    bar.ax.tick_params(labelsize=font + 2 if small else big - 4)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# --- confusion data ----------------------------------------------------------------------------------


def eval_result(run: RunMetrics, split: str, data_root: str | None) -> dict[str, Any] | None:
    """The saved evaluation of best.pt on split, made now if missing; None (with a warning) if impossible."""
    from bfly.core.trained import default_out
    from bfly.job.exits import USER_ERRORS

    best = run.run_dir / BEST
    saved = default_out(best, split)
    if saved.is_file():
        return json.loads(saved.read_text())
    if not best.is_file():
        print(
            f"bfly.report: warning: {run.run_dir}: no {BEST} and no {saved.name}: no confusion matrix", file=sys.stderr
        )
        return None
    from bfly.core.env import DistEnv
    from bfly.core.stack import pick_device
    from bfly.core.trained import evaluate_checkpoint

    print(f"evaluating {best} on the {split} split for the confusion matrix", flush=True)
    single = DistEnv(0, 0, 1, 1, "single", "env://")  # one process, even when launched under torchrun
    device = pick_device()
    try:
        result = evaluate_checkpoint(best, split, single, device, data_root)
    except USER_ERRORS as e:
        print(f"bfly.report: warning: {run.run_dir}: cannot evaluate {BEST}: {e}; no confusion matrix", file=sys.stderr)
        return None
    saved.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- table ---------------------------------------------------------------------------------------------


def _pct(best: tuple[float, int] | None, with_epoch: bool = False) -> str:
    if best is None:
        return "–"
    return f"{100 * best[0]:.2f}%" + (f" (epoch {best[1]})" if with_epoch else "")


def summary_table(runs: list[RunMetrics]) -> str:
    lines = [
        "| run | model | epochs | best train top-1 | best valid top-1 | best test top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.label} | {r.model} | {len(r.records)} | {_pct(r.best('train'))} | "
            f"{_pct(r.best('valid'), True)} | {_pct(r.best('test'), True)} |"
        )
    return "\n".join(lines)


def write_report(
    runs: list[RunMetrics], out: Path, confusion_split: str, data_root: str | None, over_seeds: bool = False
) -> list[Path]:
    """over_seeds: the mean ± std section even when no setting has more than one run."""
    labels = [r.label for r in runs]
    for r in runs:  # two runs/<x> folders from different places: tell them apart
        if labels.count(r.label) > 1:
            r.label = f"{r.run_dir.resolve().parent.name}/{r.label}"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(runs, "top1", out / "accuracy.png"), plot_curves(runs, "loss", out / "loss.png")]
    md = [
        "# Training report",
        "",
        summary_table(runs),
        "",
        "Highest top-1 accuracy over the epochs in each run's metrics.jsonl (– : split not evaluated).",
        "",
        "![top-1 accuracy per epoch](accuracy.png)",
        "",
        "![loss per epoch](loss.png)",
        "",
    ]
    groups = settings(runs)
    if over_seeds or any(len(g) > 1 for g in groups.values()):
        written.append(plot_seeds(groups, out / "seeds.png"))
        md += [
            "## Over seeds",
            "",
            seeds_table(groups),
            "",
            "Mean ± sample standard deviation over the runs of each setting (its seeds).",
            "",
            "![valid top-1 per epoch, mean and std over seeds](seeds.png)",
            "",
        ]
    if confusion_split != "none":
        for r in runs:
            result = eval_result(r, confusion_split, data_root)
            if result is None:
                continue
            png = plot_confusion(result, r.label, out / f"confusion-{r.label.replace('/', '-')}-{confusion_split}.png")
            written.append(png)
            md += [f"![{r.label} confusion matrix ({confusion_split})]({png.name})", ""]
    md += attempts_section(runs)
    md += goodput_section(runs)
    (out / "summary.md").write_text("\n".join(md))
    return [*written, out / "summary.md"]


# --- attempt history ---------------------------------------------------------------------------------


def attempts_section(runs: list[RunMetrics]) -> list[str]:
    """Markdown lines: each run's attempt history (bfly.attempts), for the runs that have one."""
    from bfly.job.attempts import history_table

    md = []
    for r in runs:
        table = history_table(r.run_dir)
        if table:
            md += [f"## Attempts of {r.label}", "", table, ""]
    return md


def print_attempts(run_dirs: list[Path]) -> int:
    """`--attempts`: each run's attempt history table; exit 2 when a run has none."""
    from bfly.job.attempts import history_table

    return _print_each(run_dirs, "attempts", history_table)


# --- goodput -------------------------------------------------------------------------------------------


def goodput_section(runs: list[RunMetrics]) -> list[str]:
    """Markdown lines: each run's goodput (bfly.run.goodput), for the runs that have an attempt history."""
    md = []
    for r in runs:
        g = goodput.of_run(r.run_dir)
        if g is not None:
            md += [f"## Goodput of {r.label}", "", goodput.report(g), ""]
    return md


def print_goodput(run_dirs: list[Path]) -> int:
    """`--goodput`: each run's goodput tables; exit 2 when a run has no attempt history."""
    return _print_each(run_dirs, "goodput", _goodput_table)


def _goodput_table(run_dir: Path) -> str | None:
    g = goodput.of_run(run_dir)
    return None if g is None else goodput.report(g)


def _print_each(run_dirs: list[Path], what: str, table_of: Callable[[Path], str | None]) -> int:
    """Each run's `what` table (from its attempt history); exit 2 when a run has none."""
    missing = 0
    for run_dir in run_dirs:
        table = table_of(run_dir)
        if table is None:
            print(
                f"bfly.report: error: {run_dir / ATTEMPTS} not found (runs started before it existed have none)",
                file=sys.stderr,
            )
            missing += 1
            continue
        print(f"{what} of {run_dir}:\n{table}\n")
    return 2 if missing else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bfly.report",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", type=Path)
    p.add_argument("--group", help="the runs of this wandb group (launch.submit's --group), found under --root")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where --group looks for runs (default: runs)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report)")
    p.add_argument(
        "--confusion",
        default="valid",
        choices=(*SPLIT_NAMES, "none"),
        help="split of the confusion matrices (default: valid)",
    )
    p.add_argument("--data-root", help="dataset folder for evaluating best.pt (default: the run's own)")
    p.add_argument("--attempts", action="store_true", help="only print each run's attempt history (attempts.jsonl)")
    p.add_argument(
        "--goodput",
        action="store_true",
        help="only print each run's goodput: its wall clock and GPU-hours by cause, per part and per attempt",
    )
    return show_defaults(p).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.attempts:
        return print_attempts(args.run_dirs)
    if args.goodput:
        return print_goodput(args.run_dirs)
    try:
        if not args.run_dirs and not args.group:
            raise ReportError("give run directories or --group")
        dirs = list(args.run_dirs) + (group_runs(args.root, args.group) if args.group else [])
        runs = [load_run(d) for d in dict.fromkeys(dirs)]
        written = write_report(runs, args.out, args.confusion, args.data_root, over_seeds=bool(args.group))
    except ReportError as e:
        print(f"bfly.report: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(runs))
    if args.out / "seeds.png" in written:
        print(seeds_table(settings(runs)))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
