"""Spec of the wandb logging: real offline runs of the real trainer, read back from wandb's own files.

An offline run writes every record to <run dir>/wandb/offline-run-*/run-<id>.wandb, a LevelDB-style
log of `wandb_internal_pb2.Record` protobufs; `wandb sync` uploads exactly these records. The
tests parse that log, so they check what the dashboard would show.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from bfly.core.checkpoint import load
from bfly.core.config import ConfigError
from bfly.job.exits import EXIT_STOPPED

import conftest
from conftest import one_epoch_overrides, tiny_dataset

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from bfly.run import wandb_log  # noqa: E402

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a real key: 40 hex digits


# --- reading a run back --------------------------------------------------------------------------------


def read_records(path: Path) -> list[pb.Record]:
    """Records of a .wandb file: a 7-byte header, then LevelDB log blocks of 32 KiB holding chunks
    (crc32 4 bytes, length 2, type 1: full / first / middle / last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRun:
    """One offline run directory (one job's part of a run), decoded."""

    dir: Path
    run_id: str = ""
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def read(cls, run_dir: Path) -> WandbRun:
        (log,) = run_dir.glob("run-*.wandb")
        out = cls(run_dir)
        for r in read_records(log):
            kind = r.WhichOneof("record_type")
            out.kinds.append(kind)
            if kind == "run":
                out.run, out.run_id = r.run, r.run.run_id
                out.config = {_key(i): json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "history":
                out.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                out.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
            elif kind == "exit":
                out.exit_code = r.exit.exit_code
        return out

    @property
    def steps(self) -> list[int]:
        return [h["_step"] for h in self.history]

    def rows_with(self, prefix: str) -> list[dict[str, Any]]:
        return [h for h in self.history if any(k.startswith(prefix) for k in h)]


def wandb_runs(run_dir: Path) -> list[WandbRun]:
    """The offline runs in a bfly run directory, oldest first."""
    return [WandbRun.read(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def files_containing(needle: bytes, *roots: Path) -> list[Path]:
    return [
        p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()
    ]


# --- environment ---------------------------------------------------------------------------------------


def wandb_env(mp: pytest.MonkeyPatch, home: Path) -> dict[str, Path]:
    """wandb's own folders in tmp, a fake API key in the environment, no user settings leaking in."""
    names = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    dirs = {name: home / name.lower() for name in names}
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        mp.setenv(name, str(path))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_API_KEY", FAKE_KEY)
    mp.setenv("NETRC", str(home / "no-netrc"))
    mp.delenv("WANDB_MODE", raising=False)
    return dirs


@contextlib.contextmanager
def fresh_wandb(home: Path) -> Iterator[tuple[pytest.MonkeyPatch, dict[str, Path]]]:
    """wandb_env for in-process runs. wandb reads the environment once per process (at its first
    init), so its process-wide state is torn down before and after."""
    with pytest.MonkeyPatch.context() as mp:
        dirs = wandb_env(mp, home)
        wandb.teardown()
        try:
            yield mp, dirs
        finally:
            wandb.teardown()


WANDB_KEYS = {
    "wandb.mode": "offline",
    "wandb.project": "butterflies",
    "wandb.group": "seed-comparison",
    "wandb.name": "resnet50-tiny",
    "wandb.tags": "[tiny,cpu]",
    "wandb.notes": "test run",
    "wandb.samples": 4,
}


# --- one process: preempted by SIGTERM, requeued, then a crash and a restart from an older checkpoint ---


@pytest.fixture(scope="module")
def requeued_run(tmp_path_factory) -> dict[str, Any]:
    from bfly.job.train import main as train_main

    base = tmp_path_factory.mktemp("wandb-single")
    data = tiny_dataset(base / "data", {"train": 1, "valid": 1, "test": 1})
    run_dir = base / "run"
    args = one_epoch_overrides(data, run_dir, **{"train.epochs": 2, "train.batch_size": 5, **WANDB_KEYS})
    real_log_step = wandb_log.WandbSink.log_step

    def log_step_then_sigterm(self, record, step):  # the stop signal reaches the trainer after step 3
        real_log_step(self, record, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with fresh_wandb(base / "home") as (_, dirs):
        with pytest.MonkeyPatch.context() as preempt:
            preempt.setattr(wandb_log.WandbSink, "log_step", log_step_then_sigterm)
            assert train_main(args) == EXIT_STOPPED  # job 1: stopped at step 3 (epoch 2) with a checkpoint
        run_id = load(run_dir / "last.pt")["wandb_run_id"]
        assert train_main(args) == 0  # job 2 (requeued): finishes epoch 2
        metrics_done = metrics(run_dir)
        # Job 3: as if job 2 had crashed after logging everything but before its last checkpoint.
        os.replace(run_dir / "last.prev.pt", run_dir / "last.pt")
        assert load(run_dir / "last.pt")["global_step"] == 3
        assert train_main(args) == 0
        assert train_main(args) == 0  # job 4: nothing left to train, so nothing to log (no 4th part)
    return {"run_dir": run_dir, "run_id": run_id, "metrics": metrics_done, "dirs": dirs}


@pytest.mark.slow
def test_each_job_continues_the_same_wandb_run(requeued_run):
    run_dir = requeued_run["run_dir"]
    jobs = wandb_runs(run_dir)
    assert len(jobs) == 3
    assert {j.run_id for j in jobs} == {requeued_run["run_id"]}
    # wandb adds "-1" to a folder's name when two jobs start within the same second
    assert all(f"-{requeued_run['run_id']}" in d.name for d in (run_dir / "wandb").glob("offline-run-*"))
    assert load(run_dir / "best.pt")["wandb_run_id"] == requeued_run["run_id"]


def test_a_preempted_job_marks_the_run_preempting_not_finished(requeued_run):
    first = wandb_runs(requeued_run["run_dir"])[0]
    assert "preempting" in first.kinds
    assert first.exit_code == 128 + signal.SIGTERM
    assert not first.rows_with("per_class/")


def test_steps_never_go_backwards_and_no_epoch_is_logged_twice(requeued_run):
    jobs = wandb_runs(requeued_run["run_dir"])
    assert [j.steps for j in jobs] == [[1, 2, 3], [4], [5]]
    epochs = [h["epoch"] for j in jobs for h in j.history if "epoch" in h]
    assert epochs == [1, 2]
    assert [j.exit_code for j in jobs[1:]] == [0, 0]


def test_per_step_training_metrics(requeued_run):
    first = wandb_runs(requeued_run["run_dir"])[0]
    for row in first.history:
        assert {"train/loss", "train/lr", "train/img_per_s", "train/data_wait", "train/epoch"} <= row.keys()
        assert row["train/loss"] > 0 and row["train/img_per_s"] > 0 and 0 <= row["train/data_wait"] <= 1
    assert [row["train/epoch"] for row in first.history] == [0, 0, 1]
    lrs = [row["train/lr"] for row in first.history]
    assert lrs[0] == 0.05 and lrs == sorted(lrs, reverse=True)  # no warmup: the cosine from the peak


def test_per_epoch_metrics_equal_metrics_jsonl_at_the_epochs_last_step(requeued_run):
    rows = [h for j in wandb_runs(requeued_run["run_dir"]) for h in j.history if "epoch" in h]
    for row, record in zip(rows, requeued_run["metrics"], strict=True):
        assert row["_step"] == record["step"] and row["epoch"] == record["epoch"] + 1
        for key in (
            "train_loss",
            "train_top1",
            "train_top5",
            "valid_loss",
            "valid_top1",
            "valid_top5",
            "lr",
            "epoch_s",
            "img_per_s",
        ):
            assert row[f"epoch/{key}"] == record[key], key


def test_config_and_run_settings(requeued_run):
    job = wandb_runs(requeued_run["run_dir"])[0]
    saved = yaml.safe_load((requeued_run["run_dir"] / "config.yaml").read_text())
    for section in ("model", "data", "optim", "train", "dist", "wandb", "run"):
        assert job.config[section] == saved[section], section
    assert job.config["job"]["world_size"] == 1 and job.config["job"]["num_classes"] == 10
    assert job.run.project == "butterflies" and job.run.run_group == "seed-comparison"
    assert job.run.display_name == "resnet50-tiny" and list(job.run.tags) == ["tiny", "cpu"]
    assert job.run.notes == "test run"


def test_end_of_run_tables_confusion_matrix_and_samples(requeued_run):
    run_dir = requeued_run["run_dir"]
    second = wandb_runs(run_dir)[1]
    (end,) = second.rows_with("per_class/")
    assert end["_step"] == 4 and "confusion/valid_table/_type" in end
    files = second.dir / "files"
    table = json.loads((files / end["per_class/valid/path"]).read_text())
    assert table["columns"] == ["class_id", "species", "accuracy", "correct", "images"]
    class_names = load(run_dir / "best.pt")["class_names"]
    assert [row[1] for row in table["data"]] == class_names
    correct = sum(row[3] for row in table["data"])
    assert correct / sum(row[4] for row in table["data"]) == requeued_run["metrics"][-1]["valid_top1"]
    confusion = json.loads((files / end["confusion/valid_table/path"]).read_text())
    assert sum(n for actual, predicted, n in confusion["data"] if actual == predicted) == correct
    captions = end["samples/valid/captions"]
    assert len(captions) == 4 and all(" true " in c and "predicted " in c for c in captions)
    assert all((files / f).is_file() for f in end["samples/valid/filenames"])


def test_summary_holds_the_best_checkpoint(requeued_run):
    run_dir = requeued_run["run_dir"]
    best = load(run_dir / "best.pt")["metrics"]
    summary = wandb_runs(run_dir)[-1].summary
    assert summary["best/checkpoint"] == str((run_dir / "best.pt").resolve())
    assert summary["best/valid_top1"] == best["valid_top1"] and summary["best/epoch"] == best["epoch"] + 1


def test_summary_holds_the_goodput_so_far(requeued_run):
    """At the end of job 3 (attempt 3 under way): the wall clock split by cause, as bfly.report prints it."""
    goodput = wandb_runs(requeued_run["run_dir"])[-1].summary["goodput"]
    assert goodput["attempts"] == 3 and 0 < goodput["ratio"] < 1
    seconds = goodput["seconds"]
    assert list(seconds) == ["training", "start-up", "evaluation", "checkpoint stall", "recomputed"] + [
        "hang detection",
        "restart",
        "queued",
        "other",
    ]
    assert sum(seconds.values()) == pytest.approx(goodput["wall_clock_s"])
    assert seconds["training"] == pytest.approx(goodput["ratio"] * goodput["wall_clock_s"])
    assert seconds["evaluation"] > 0 and seconds["checkpoint stall"] > 0
    assert goodput["gpu_hours"] == pytest.approx(goodput["wall_clock_s"] / 3600)  # one process


def test_the_api_key_is_written_nowhere(requeued_run):
    run_dir, dirs = requeued_run["run_dir"], requeued_run["dirs"]
    assert files_containing(FAKE_KEY.encode(), run_dir, *dirs.values()) == []
    assert len(list(run_dir.rglob("*"))) > 20  # the search did look at wandb's files


def kill_wandb_service() -> None:
    """SIGTERM to wandb's service process (a child of this one), as a scheduler signalling every
    process of a job does; returns once it has exited."""
    ps = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    (pid,) = [int(line.split()[0]) for line in ps.stdout.splitlines() if "wandb-core" in line]
    os.kill(pid, signal.SIGTERM)
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(100):
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":  # exited
            return
        time.sleep(0.1)
    raise AssertionError("wandb-core did not exit on SIGTERM")


def test_a_signal_that_also_stops_wandb_still_leaves_a_checkpoint(tmp_path, capsys):
    """SLURM preemption signals every process of the job, wandb's service included."""
    from bfly.job.train import main as train_main

    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    run_dir = tmp_path / "run"
    args = one_epoch_overrides(data, run_dir, **{"train.batch_size": 5, "train.epochs": 2, **WANDB_KEYS})
    real_log_step = wandb_log.WandbSink.log_step

    def log_step_then_sigterm_everyone(self, record, step):
        real_log_step(self, record, step)
        if step == 1:
            kill_wandb_service()
            os.kill(os.getpid(), signal.SIGTERM)

    with fresh_wandb(tmp_path / "home"):
        with pytest.MonkeyPatch.context() as preempt:
            preempt.setattr(wandb_log.WandbSink, "log_step", log_step_then_sigterm_everyone)
            assert train_main(args) == EXIT_STOPPED
        assert "wandb failed while updating the summary" in capsys.readouterr().out
        saved = load(run_dir / "last.pt")
        assert saved["global_step"] == 1 and saved["wandb_run_id"]
        assert train_main(args) == 0  # the requeued job logs to the same run
    # wandb's service drops what it has not yet written when it gets SIGTERM: the first job's part
    # of the run may be lost locally, but the run goes on under the same id.
    first, second = wandb_runs(run_dir)
    assert first.dir.name.endswith(saved["wandb_run_id"]) and second.run_id == saved["wandb_run_id"]
    assert second.steps == [2, 3, 4] and second.exit_code == 0


# --- two processes --------------------------------------------------------------------------------------


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = conftest.torchrun(2, "bfly.train", args, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_two_process_job_is_one_run_and_its_resume_continues_it(tmp_path):
    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        wandb_env(mp, tmp_path / "home")
        env = dict(os.environ)
    torchrun(one_epoch_overrides(data, run_dir, **{**WANDB_KEYS, "train.batch_size": 4}), env)
    (first,) = wandb_runs(run_dir)  # rank 1 created no run
    assert first.steps == [1, 2] and first.config["job"]["world_size"] == 2
    # Raising train.epochs changes the schedule: allowed explicitly, and the change is logged to the run.
    torchrun(
        one_epoch_overrides(
            data,
            run_dir,
            **{**WANDB_KEYS, "train.batch_size": 4, "train.epochs": 2, "run.allow_changes": "[train.epochs]"},
        ),
        env,
    )
    _first_again, second = wandb_runs(run_dir)
    assert second.run_id == first.run_id == load(run_dir / "last.pt")["wandb_run_id"]
    assert second.steps == [3, 4]
    assert [h["epoch"] for j in (first, second) for h in j.history if "epoch" in h] == [1, 2]
    assert second.summary["config_changes"] == {"global_step": 2, "train.epochs": "1 -> 2"}


# --- modes and a missing wandb ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_mode, env, key, expected",
    [
        ("auto", {}, True, "online"),
        ("auto", {}, False, "offline"),
        ("online", {"WANDB_MODE": "offline"}, True, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, True, "disabled"),
        ("offline", {"WANDB_MODE": "dryrun"}, True, "offline"),
    ],
)
def test_mode_resolution(config_mode, env, key, expected, monkeypatch, tmp_path):
    wandb_env(monkeypatch, tmp_path)
    if not key:
        monkeypatch.delenv("WANDB_API_KEY")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_log.resolve_mode(config_mode) == expected


def test_an_api_key_in_netrc_counts_as_configured(monkeypatch, tmp_path):
    wandb_env(monkeypatch, tmp_path)
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_log.resolve_mode("auto") == "online"


def test_an_unknown_wandb_mode_variable_is_a_clear_error(monkeypatch, tmp_path):
    wandb_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' is not one of online, offline, disabled"):
        wandb_log.resolve_mode("auto")


@pytest.fixture
def without_wandb(monkeypatch):
    """As if wandb were not installed: importing it raises ImportError."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delitem(sys.modules, "bfly.run.wandb_log", raising=False)


def test_training_without_wandb_installed(without_wandb, tmp_path, capsys, monkeypatch):
    from bfly.job.train import main as train_main

    wandb_env(monkeypatch, tmp_path / "home")
    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    assert train_main(one_epoch_overrides(data, tmp_path / "auto", **{"wandb.mode": "auto"})) == 0
    assert "wandb is not installed: logging to metrics.jsonl only" in capsys.readouterr().out
    assert not (tmp_path / "auto" / "wandb").exists() and (tmp_path / "auto" / "metrics.jsonl").is_file()

    assert train_main(one_epoch_overrides(data, tmp_path / "offline", **{"wandb.mode": "offline"})) == 2
    assert "wandb.mode=offline but wandb cannot be imported" in capsys.readouterr().err

    # The variable decided, not the config (which says auto): the error names the variable.
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert train_main(one_epoch_overrides(data, tmp_path / "env", **{"wandb.mode": "auto"})) == 2
    err = capsys.readouterr().err
    assert "WANDB_MODE=offline but wandb cannot be imported" in err and "wandb.mode" not in err


def test_wandb_mode_variable_disables_logging(tmp_path, monkeypatch):
    from bfly.job.train import main as train_main

    wandb_env(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    assert train_main(one_epoch_overrides(data, tmp_path / "run", **{"wandb.mode": "offline"})) == 0
    assert not (tmp_path / "run" / "wandb").exists()
    assert load(tmp_path / "run" / "last.pt")["wandb_run_id"] is None


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that never answers, like a server behind a firewall that drops packets: a
    listener that accepts nothing, its queue full (Linux then drops new connection requests)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # fills the queue
            yield port


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens


def test_no_route_is_decided_in_seconds():
    start = time.perf_counter()
    port = closed_port()
    assert wandb_log.no_route(f"http://127.0.0.1:{port}") == f"127.0.0.1:{port}: Connection refused"
    assert time.perf_counter() - start < 1
    with silent_port() as port:
        start = time.perf_counter()
        assert (
            wandb_log.no_route(f"http://127.0.0.1:{port}", timeout_s=2) == f"no answer from 127.0.0.1:{port} within 2 s"
        )
        assert 1.9 < time.perf_counter() - start < 3
    with socket.socket() as server:  # a server that answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        assert wandb_log.no_route(f"http://127.0.0.1:{server.getsockname()[1]}/graphql") is None


def test_a_proxy_is_what_must_answer(monkeypatch):
    """Behind an HTTP proxy the node reaches the server through it: the proxy is probed."""
    proxy = closed_port()
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert wandb_log.no_route("https://api.wandb.ai") == (
        f"127.0.0.1:{proxy} (the proxy to https://api.wandb.ai): Connection refused"
    )
    # wandb's own proxy setting (WANDB_HTTPS_PROXY) wins, as in wandb.
    own = closed_port()
    assert wandb_log.no_route("https://api.wandb.ai", f"http://127.0.0.1:{own}") == (
        f"127.0.0.1:{own} (the proxy to https://api.wandb.ai): Connection refused"
    )


def test_auto_mode_goes_offline_in_seconds_when_the_server_cannot_be_reached(tmp_path, capsys):
    """A key is configured (shared home on a cluster) but the compute node has no route out: wandb alone
    would retry for 90 s at every start and requeue."""
    from bfly.job.train import main as train_main

    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    real_init, seconds = wandb_log._init, []

    def timed_init(*args, **kwargs):  # the real one, timed: from the decision to a run that logs
        start = time.perf_counter()
        try:
            return real_init(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    with fresh_wandb(tmp_path / "home") as (mp, _), silent_port() as port:
        mp.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        mp.setattr(wandb_log, "_init", timed_init)
        assert train_main(one_epoch_overrides(data, tmp_path / "auto", **{"wandb.mode": "auto"})) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "no route" in ln]
    assert line == (
        f"warning: wandb.mode=auto: no route to http://127.0.0.1:{port} (no answer from 127.0.0.1:{port} "
        f"within 5 s): logging offline to {tmp_path / 'auto' / 'wandb'}; upload later with `wandb sync`"
    )
    print(f"wandb.mode=auto without a route: {seconds[0]:.1f} s to an offline run")
    assert seconds[0] < 20  # wandb alone: 90 s
    (job,) = wandb_runs(tmp_path / "auto")
    assert job.exit_code == 0 and job.rows_with("epoch")
    assert list((tmp_path / "auto" / "wandb").glob("run-*")) == []  # wandb never tried online


@pytest.mark.slow
def test_auto_mode_falls_back_to_offline_when_wandb_cannot_reach_its_server(tmp_path, capsys):
    """The server answers, but wandb still cannot log online (here: it is not a wandb server)."""
    from bfly.job.train import main as train_main

    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    with fresh_wandb(tmp_path / "home") as (mp, _), socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)  # takes connections and never answers a request
        mp.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        mp.setenv("WANDB_INIT_TIMEOUT", "3")
        assert train_main(one_epoch_overrides(data, tmp_path / "auto", **{"wandb.mode": "auto"})) == 0
        assert "wandb cannot log online (" in capsys.readouterr().out
        assert train_main(one_epoch_overrides(data, tmp_path / "online", **{"wandb.mode": "online"})) == 2
    (job,) = wandb_runs(tmp_path / "auto")
    assert job.exit_code == 0 and job.rows_with("epoch")
    err = capsys.readouterr().err.strip()
    assert err.startswith("bfly.train: error: wandb cannot log online with wandb.mode=online (")
    assert err.endswith("`wandb sync`")


def test_the_slurm_ids_of_the_job_are_in_the_run(tmp_path):
    """A task of SLURM job array 4240 (task 2, job id 4242): the ids are in the run's `job` config."""
    from bfly.job.train import main as train_main

    data = tiny_dataset(tmp_path / "data", {"train": 1, "valid": 1, "test": 1})
    with fresh_wandb(tmp_path / "home") as (mp, _):
        for name in [n for n in os.environ if n.startswith("SLURM_")]:
            mp.delenv(name)
        mp.setenv("SLURM_JOB_ID", "4242")
        mp.setenv("SLURM_ARRAY_JOB_ID", "4240")
        mp.setenv("SLURM_ARRAY_TASK_ID", "2")
        assert train_main(one_epoch_overrides(data, tmp_path / "run", **{"wandb.mode": "offline"})) == 0
    (job,) = wandb_runs(tmp_path / "run")
    ids = {k: v for k, v in job.config["job"].items() if k.startswith("slurm_")}
    assert ids == {"slurm_job_id": "4242", "slurm_array_job_id": "4240", "slurm_array_task_id": "2"}
