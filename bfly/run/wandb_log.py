"""Weights & Biases logging: a bfly.runlog sink that rank 0 adds to its RunLog.

bfly.train imports this module lazily; its `import wandb` is what makes wandb optional.

What a run shows on the dashboard:
- config: the resolved config, plus a `job` section (world size, classes, images, device);
- per logged optimizer step (wandb step = global optimizer step): train/loss, train/top1, train/lr,
  train/img_per_s, train/data_wait, train/epoch, train/gpu_mem_gb (CUDA);
- per epoch, against `epoch` (epochs completed): epoch/train_top1, epoch/valid_top1, ... every
  number of the metrics.jsonl record;
- at the end: per_class/<split> tables with species names, confusion/<split> charts and
  samples/<split> images captioned with the predicted and true species;
- summary: best/checkpoint (the path of best.pt) and best/<metric> of the epoch it holds; goodput: the
  effective training time ratio, the wall clock and GPU-hours so far, split by cause (bfly.run.goodput).

wandb's files live in <run dir>/wandb. The run id is kept in the checkpoints, so a resumed or
requeued job continues the same run; wandb_resume.json in the run directory remembers the last
step and epoch logged, so a job that resumes from an older checkpoint (after a crash) never logs a
step twice or backwards, online or offline (offline runs are uploaded later with `wandb sync`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import torch
import wandb

from bfly.core import checkpoint as ckpt
from bfly.core.config import Config, ConfigError, flat, to_dict
from bfly.core.data.metadata import DatasetMeta, Split
from bfly.core.data.pil_input import open_rgb
from bfly.core.env import proxy_for, slurm_ids, wandb_api_key_configured, wandb_mode_override, wandb_mode_setting
from bfly.run import goodput

RESUME_FILE = "wandb_resume.json"
MODES = ("online", "offline", "disabled")
Mode = Literal["online", "offline", "disabled"]
THUMBNAIL = 256  # px: sample images are for a glance, not for archiving the dataset
# A server that can be reached answers a TCP connect in well under a second, even across the world;
# without a route the connect hangs, and wandb would retry for 90 s at every start and requeue.
ROUTE_TIMEOUT_S = 5.0


def resolve_mode(config_mode: str) -> Mode:
    """WANDB_MODE wins over wandb.mode; auto = online when an API key is configured, else offline."""
    override = wandb_mode_override()
    mode = {"dryrun": "offline", "run": "online"}.get(override or config_mode, override or config_mode)
    if mode == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    if mode not in MODES:
        raise ConfigError(f"WANDB_MODE={override!r} is not one of {', '.join(MODES)}")
    return cast(Mode, mode)


def no_route(url: str, proxy: str | None = None, timeout_s: float = ROUTE_TIMEOUT_S) -> str | None:
    """Why the server of `url` (or the proxy to it: `proxy`, else the environment's) takes no TCP
    connection within timeout_s; None when it does. In a thread: name resolution has no timeout of its own."""
    proxy = proxy or proxy_for(url)
    target = urllib.parse.urlsplit(proxy or url)
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    where = f"{host}:{port}" + (f" (the proxy to {url})" if proxy else "")
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except socket.gaierror as e:
            outcome.append(f"cannot resolve {host} ({e.strerror})")
        except TimeoutError:
            outcome.append(f"no answer from {where} within {timeout_s:g} s")
        except OSError as e:
            outcome.append(f"{where}: {e.strerror or e}")

    thread = threading.Thread(target=connect, name="wandb-route", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer from {where} within {timeout_s:g} s"


def job_info(world_size: int, meta: DatasetMeta, device_type: str, run_dir: Path) -> dict[str, Any]:
    """The `job` section of the run's wandb config; a requeued job updates it (its SLURM ids)."""
    return {
        "world_size": world_size,
        "num_classes": meta.num_classes,
        "train_images": len(meta.splits["train"].paths),
        "layout": meta.layout,
        "device": device_type,
        "run_dir": str(run_dir.resolve()),
        **slurm_ids(),
    }


Probabilities = Callable[[list], torch.Tensor]  # RGB images -> (N, classes) softmax of the final model


class WandbSink:
    def __init__(self, wb: Any, run_dir: Path, floor: int, last_epoch: int, warn: Callable[[str], None]):
        self.wb, self.run_dir, self.warn = wb, run_dir, warn
        self.floor = floor  # the last step logged by an earlier job: never log at or below it
        self.last_epoch = last_epoch  # the last epoch record logged, by any job
        self.step = floor  # the last step logged
        self.broken = False

    @property
    def run_id(self) -> str:
        return self.wb.id

    @classmethod
    def open(
        cls, cfg: Config, run_dir: Path, job: dict[str, Any], resume_id: str | None, warn: Callable[[str], None]
    ) -> WandbSink:
        """resume_id: the wandb run id a resumed checkpoint carries (None: a new wandb run)."""
        wb = _init(cfg, run_dir, job, resume_id, warn)
        wb.define_metric("epoch")
        wb.define_metric("epoch/*", step_metric="epoch")
        saved = _read_resume(run_dir)
        floor, last_epoch = wb.step - 1, -1  # online, wandb knows the resumed run's next step
        if saved.get("run_id") == wb.id:
            floor, last_epoch = max(floor, saved["step"]), saved["epoch"]
        return cls(wb, run_dir, floor, last_epoch, warn)

    def log_step(self, record: dict[str, Any], step: int) -> None:
        if step <= self.floor:  # already logged before a crash; wandb would drop it
            return
        self._log({k if "/" in k else f"train/{k}": v for k, v in record.items()}, step)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        if record["epoch"] <= self.last_epoch:
            return
        data = {f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step", "time")}
        data["epoch"] = record["epoch"] + 1
        self.last_epoch = record["epoch"]
        # Normally the epoch's last step; later only when a crash left newer steps logged.
        self._log(data, max(step, self.floor + 1))

    def log_config_change(self, changes: dict[str, dict[str, Any]], step: int) -> None:
        """A change allowed on resume (run.allow_changes): the run's config shows the new values, its
        summary keeps what changed at which step (config_history.jsonl has every change)."""
        new = {k: c["new"] for k, c in changes.items() if "[" not in k}
        if new:
            self._call("updating the config", self.wb.config.update, new, allow_val_change=True)
        self._call(
            "updating the summary",
            self.wb.summary.update,
            {
                "config_changes": {
                    "global_step": step,
                    **{k: f"{c['old']!r} -> {c['new']!r}" for k, c in changes.items()},
                }
            },
        )

    def note_hang(self, line: str, exit_code: int) -> None:
        """The job ends on a hang (its watchdog, from its thread): the line goes to the run's summary and the
        run is finished as failed with the job's exit status."""
        self._call("reporting the hang", self.wb.summary.update, {"hang": line})
        self._call("finishing", self.wb.finish, exit_code=exit_code)

    def _log(self, data: dict[str, Any], step: int) -> None:
        if self._call("logging", self.wb.log, data, step=step):
            self.step = step
            _write_resume(self.run_dir, {"run_id": self.wb.id, "step": step, "epoch": self.last_epoch})

    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> bool:
        """Calls wandb; False once wandb has failed. Logging never takes the training down: a scheduler
        that signals every process of a job also stops wandb's service process."""
        if self.broken:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except (OSError, wandb.Error) as e:
            self.broken = True
            self.warn(
                f"wandb failed while {what} ({type(e).__name__}: {e}); training goes on, logging to metrics.jsonl only"
            )
            # Drop wandb's process-wide state, or its exit hook fails once more at exit, with a traceback.
            with contextlib.suppress(OSError, wandb.Error):
                wandb.teardown(exit_code=1)
            return False

    def finish(
        self,
        completed: bool,
        signal_name: str | None,
        last_eval: dict[str, Any] | None,
        meta: DatasetMeta,
        samples: int,
        probabilities: Probabilities,
    ) -> None:
        """completed: the schedule is done (else stopped, by `signal_name` or a budget). last_eval: split ->
        metrics of the latest evaluation; `samples` images of valid are captioned by `probabilities`."""
        self._call("updating the summary", self.wb.summary.update, best_summary(self.run_dir / ckpt.BEST))
        self._call("updating the summary", self.wb.summary.update, goodput_summary(self.run_dir))
        if not completed:
            # Stopped by a signal to be requeued: the next job resumes this run.
            self._call("marking the run preempting", self.wb.mark_preempting)
            self._call("finishing", self.wb.finish, exit_code=_signal_exit_code(signal_name))
            return
        if self.broken:
            return
        data: dict[str, Any] = {}
        names = list(meta.class_names)
        for split, m in (last_eval or {}).items():
            data[f"per_class/{split}"] = per_class_table(m, names)
            data[f"confusion/{split}"] = confusion_chart(m["confusion"], names, split)
        shown = "valid" if "valid" in meta.splits else next(iter(last_eval or {}), None)
        if shown and samples > 0:
            data[f"samples/{shown}"] = sample_images(meta.splits[shown], names, samples, probabilities)
        if data:
            self._log(data, max(self.step, self.floor + 1))
        self._call("finishing", self.wb.finish)


def _init(cfg: Config, run_dir: Path, job: dict[str, Any], resume_id: str | None, warn: Callable[[str], None]) -> Any:
    c = cfg.wandb
    mode = resolve_mode(c.mode)
    auto = (wandb_mode_override() or c.mode) == "auto"
    values = flat(to_dict(cfg))
    kwargs: dict[str, Any] = {
        "dir": run_dir,
        "entity": c.entity or None,
        "project": c.project or None,
        "group": c.group or None,
        "job_type": c.job_type or None,
        "name": c.name or run_dir.resolve().name,
        "tags": c.tags or None,
        "notes": c.notes or None,
        "id": resume_id,
        "resume": "allow" if resume_id else None,
        # `varies`: what sets this run apart in its group (a grid's keys), to filter and group by.
        "config": {**to_dict(cfg), "varies": {k: values[k] for k in c.varies}, "job": job},
    }
    if mode == "online" and auto:
        settings = wandb.setup().settings  # WANDB_BASE_URL, `wandb login --host`, or wandb's own server
        server = settings.base_url
        why = no_route(server, settings.https_proxy if server.startswith("https:") else settings.http_proxy)
        if why:
            warn(
                f"wandb.mode=auto: no route to {server} ({why}): logging offline to {run_dir / 'wandb'}; "
                "upload later with `wandb sync`"
            )
            return wandb.init(mode="offline", **kwargs)
    try:
        return wandb.init(mode=mode, **kwargs)
    except wandb.Error as e:
        if mode != "online":
            raise
        reason = str(e).strip().splitlines()[0]
        if not auto:
            raise ConfigError(
                f"wandb cannot log online with {wandb_mode_setting(c.mode)} ({reason}); set wandb.mode=offline "
                "or auto (or WANDB_MODE=offline) and upload the run later with `wandb sync`"
            ) from None
        # A key is configured but this node has no way out (common on clusters): keep the run offline.
        warn(
            f"wandb cannot log online ({reason}): logging offline to {run_dir / 'wandb'}; "
            "upload later with `wandb sync`"
        )
    return wandb.init(mode="offline", **kwargs)


def per_class_table(m: dict[str, Any], names: list[str]) -> wandb.Table:
    confusion = m["confusion"]
    rows = [[i, name, m["per_class"][i], int(confusion[i, i]), int(confusion[i].sum())] for i, name in enumerate(names)]
    return wandb.Table(columns=["class_id", "species", "accuracy", "correct", "images"], data=rows)


def confusion_chart(confusion: torch.Tensor, names: list[str], split: str) -> Any:
    # wandb builds the chart from label lists: expand the counts (a split has at most a few thousand).
    n = confusion.shape[0]
    counts = confusion.flatten()
    true = torch.arange(n).repeat_interleave(n).repeat_interleave(counts).tolist()
    pred = torch.arange(n).repeat(n).repeat_interleave(counts).tolist()
    return wandb.plot.confusion_matrix(y_true=true, preds=pred, class_names=names, title=f"Confusion matrix ({split})")


def sample_images(s: Split, names: list[str], n: int, probabilities: Probabilities) -> list[wandb.Image]:
    """n images spread over the split, captioned with the final model's prediction and the truth."""
    picks = sorted({i * len(s.paths) // n for i in range(min(n, len(s.paths)))})
    images = [open_rgb(s.paths[i]) for i in picks]
    probs = probabilities(images)
    out = []
    for im, i, p in zip(images, picks, probs):
        pred, true = int(p.argmax()), s.labels[i]
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        mark = "right" if pred == true else "WRONG"
        out.append(wandb.Image(im, caption=f"{mark}: predicted {names[pred]} ({p[pred]:.0%}), true {names[true]}"))
    return out


def best_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        saved = ckpt.load(path)
    except ckpt.CheckpointError:
        return {}
    metrics = saved.get("metrics") or {}
    out: dict[str, Any] = {"best/checkpoint": str(path.resolve())}
    out.update({f"best/{k}": v for k, v in metrics.items() if k == "step" or k.endswith(("_top1", "_top5", "_loss"))})
    if "epoch" in metrics:
        out["best/epoch"] = metrics["epoch"] + 1  # epochs completed, as the dashboard's `epoch`
    return out


def goodput_summary(run_dir: Path) -> dict[str, Any]:
    """The run's goodput so far (bfly.run.goodput; this attempt under way until now), {} if unreadable."""
    try:
        g = goodput.of_run(run_dir, now=time.time())
    except (OSError, ValueError, KeyError, TypeError):  # a damaged record must not stop the job's end
        return {}
    return goodput.summary(g) if g is not None else {}


def _signal_exit_code(signal_name: str | None) -> int:
    # The shell's convention 128 + signal number; wandb counts any non-zero code as not finished.
    sig = signal.Signals[signal_name] if signal_name else signal.SIGTERM
    return 128 + sig.value


def _read_resume(run_dir: Path) -> dict[str, Any]:
    try:
        saved = json.loads((run_dir / RESUME_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) and {"run_id", "step", "epoch"} <= saved.keys() else {}


def _write_resume(run_dir: Path, data: dict[str, Any]) -> None:
    tmp = run_dir / f".{RESUME_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, run_dir / RESUME_FILE)
