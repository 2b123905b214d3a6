import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bfly.tools.child import REPO, child_env, run

MINI_ROOT = REPO / "data" / "butterfly-mini"

# --- the CPU tier stays on the CPU ---


def gpus_visible(markexpr: str) -> bool:
    """Only `-m gpu` runs with the machine's GPUs visible; every other selection is the CPU tier."""
    return markexpr.strip() == "gpu"


def pytest_configure(config) -> None:
    # Before anything initialises CUDA: this process (in-process training) and every child it starts
    # (torchrun, the commands) see no GPU. On a GPU machine the CPU tier would otherwise start NCCL
    # with two ranks on one GPU, and the bit-exact resume tests assume CPU arithmetic.
    if not gpus_visible(config.option.markexpr):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    BACKEND_FLAGS.update(backend_flags())


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # .ci/test runs the tests side by side (pytest-xdist, --dist loadgroup). The SLURM tests share one local
    # cluster of two nodes: one worker runs them all, one after another. They go first, as the longest group,
    # so the other workers share out the rest meanwhile; the cluster's own up/down test first of all, before
    # the cluster the others share (the slurm_cluster fixture) is up.
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: (item.get_closest_marker("slurm") is None, item.path.name != "test_local_cluster.py"))


def pytest_collection_finish(session: pytest.Session) -> None:
    # pytest-xdist groups by renaming the tests `...@slurm`; where a pytest release stops that from taking
    # effect, the SLURM tests would run on several workers at once, taking the cluster down under each other.
    if getattr(session.config.option, "loadgroup", False) and any(
        item.get_closest_marker("slurm") and not item.nodeid.endswith("@slurm") for item in session.items
    ):
        print(
            "pytest-xdist's --dist loadgroup does not group the SLURM tests with this pytest: run with -n 0, "
            "or install the pytest that pyproject.toml's test extra names",
            file=sys.__stderr__,
            flush=True,
        )
        pytest.exit("the SLURM tests are not grouped", returncode=pytest.ExitCode.USAGE_ERROR)


BACKEND_FLAGS: dict = {}  # the process's global backend flags before any test ran


def backend_flags() -> dict:
    import torch

    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
    }


def restore_backend_flags(flags: dict) -> None:
    import torch

    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn.deterministic"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul.allow_tf32"]
    enabled, warn_only = flags["deterministic"]
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _backend_flags_restored():
    """A training run in this process sets global flags (TF32, cudnn.benchmark, deterministic
    algorithms): the next test starts from the process's own."""
    yield
    restore_backend_flags(BACKEND_FLAGS)


@pytest.fixture
def mini_root_meta() -> Path:
    """The committed butterfly-mini dataset (both CSV layouts); never modify it."""
    return MINI_ROOT


def data_copy(src: Path, dst: Path) -> Path:
    """A copy of dataset `src` whose CSVs can be edited; the image folders are linked (fast)."""
    dst.mkdir(parents=True)
    for csv_file in src.glob("*.csv"):
        shutil.copy(csv_file, dst / csv_file.name)
    for split in ("train", "valid", "test"):
        (dst / split).symlink_to((src / split).resolve(), target_is_directory=True)
    return dst


@pytest.fixture
def mini_copy_meta(tmp_path: Path) -> Path:
    """An editable butterfly-mini: copied CSVs, image folders linked rather than copied (fast)."""
    return data_copy(MINI_ROOT, tmp_path / "butterfly-mini")


# --- end of data metadata / transforms fixtures ---

# --- training fixtures ---
PYTHON = sys.executable


def _package_dirs() -> tuple[str, ...]:
    """Where our packages' source files are, as frames may name them (as imported and resolved)."""
    import bfly
    import launch

    dirs = set()
    for package in (bfly, launch):
        here = Path(package.__file__).parent
        dirs |= {str(here), str(here.resolve())}
    return tuple(sorted(dirs))


def our_frames(output: str) -> list[str]:
    """The traceback frames of `output` that lie in bfly's or launch's own source files.

    Matched by the packages' real directories, not by a name: a clone may itself be called `bfly`,
    and its .venv (torch's frames) then lives under `.../bfly/` too."""
    frames = re.findall(r'^\s*File "([^"]+)", line \d+', output, re.M)
    return [f for f in frames if any(f.startswith(d + os.sep) for d in _package_dirs())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_subset(
    src: Path, dst: Path, per_class: dict[str, int], drop_class: int | None = None, layout: str = "course"
) -> Path:
    """A copy of the mini data with `per_class[split]` images per class (images linked), in the course
    layout (one CSV per split) or the Kaggle one (one CSV); `drop_class`: a class id left out."""
    import pandas as pd

    dst.mkdir(parents=True, exist_ok=True)
    kaggle = []
    for split, n in per_class.items():
        df = pd.read_csv(src / f"{split}.csv")
        df = df.sort_values("filepaths").groupby("label_id", sort=True).head(n)
        df = df[df["label_id"] != drop_class]
        if layout == "course":
            df.to_csv(dst / f"{split}.csv", index=False)
        kaggle.append(
            pd.DataFrame(
                {"class id": df["label_id"], "filepaths": df["filepaths"], "labels": df["labels"], "data set": split}
            )
        )
        if not (dst / split).exists():
            (dst / split).symlink_to(src / split, target_is_directory=True)
    if layout == "kaggle":
        pd.concat(kaggle).to_csv(dst / "butterflies and moths.csv", index=False)
    return dst


def tiny_dataset(root: Path, per_class: dict[str, int], drop_class: int | None = None, layout: str = "course") -> Path:
    """write_subset of butterfly-mini into a new folder `root`."""
    root.mkdir(parents=True)
    return write_subset(MINI_ROOT, root, per_class, drop_class, layout)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """60 train / 20 valid / 20 test images of the 10 mini species: fast CPU training runs."""
    return write_subset(MINI_ROOT, tmp_path_factory.mktemp("tiny") / "data", {"train": 6, "valid": 2, "test": 2})


@pytest.fixture(scope="session")
def ref1(tiny_data, tmp_path_factory) -> Path:
    """The fault config's uninterrupted single-process run: what a faulted run must end identical to."""
    from probes.fault_launch import fault_args, reference_run

    return reference_run(tmp_path_factory.getbasetemp(), 1, fault_args(tiny_data, Path("ref")))


@pytest.fixture(scope="session")
def ref2(tiny_data, tmp_path_factory) -> Path:
    """The same on 2 processes (torchrun)."""
    from probes.fault_launch import fault_args, reference_run

    return reference_run(tmp_path_factory.getbasetemp(), 2, fault_args(tiny_data, Path("ref")))


# The model every test of the plumbing trains (checkpoints, faults, signals, resume, grids, SLURM...): ResNet-50
# cut down to ~34k parameters, so that a step takes milliseconds and a checkpoint a few hundred KB. The real
# models keep their own tests (tests/test_models.py, tests/test_gpu_path.py, the shipped configs).
TEST_MODEL = "resnet_tiny"


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "data.root": str(data),
        "data.image_size": 32,
        "data.workers": 0,
        "model.name": TEST_MODEL,
        "train.epochs": 2,
        "train.batch_size": 12,
        "train.log_every": 1,
        "optim.lr": 0.05,
        "optim.warmup_epochs": 1,
        "wandb.mode": "disabled",
        "run.dir": str(run_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# A 1-epoch run without warm-up: 2 optimizer steps on 2 train images per class.
ONE_EPOCH = {"train.epochs": 1, "train.batch_size": 10, "optim.warmup_epochs": 0}


def one_epoch_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(data, run_dir, **{**ONE_EPOCH, **extra})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run: best.pt, last.pt, metrics.jsonl (valid and test evaluated); trained once
    per session (kept under the session's base folder)."""
    from bfly.job.train import main as train_main

    base = tmp_path_factory.getbasetemp() / "trained-run"
    run_dir = base / "run"
    if not (base / "done").exists():
        data = tiny_dataset(base / "data", {"train": 2, "valid": 3, "test": 3})
        assert train_main(one_epoch_overrides(data, run_dir, **{"train.eval_splits": "[valid,test]"})) == 0
        (base / "done").touch()
    return run_dir


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test tier's environment for a child process (bfly.tools.child.child_env): one thread per
    process, no rank of this process's own."""
    env = child_env(None, OMP_NUM_THREADS="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_python(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root, output captured, in the test tier's environment unless `env`;
    every process it started is ended with it (bfly.tools.child.run, as the GPU check runs its commands)."""
    return run([PYTHON, *args], timeout, subprocess_env() if env is None else env)


def torchrun(
    nproc: int, target: str, args: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N` of a module (`bfly.train`) or a script (`....py`), output captured."""
    program = [target] if target.endswith(".py") else ["-m", target]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return run_python(*launcher, *program, *args, timeout=timeout, env=env)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def weights(path: Path) -> dict:
    """The model weights of a checkpoint file."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    """Checkpoint files `a` and `b` hold the same weights, bit for bit."""
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture
def stopped_run(tiny_data, tmp_path) -> Path:
    """A run directory of the fault tests' config stopped by its step budget after 3 of its 10 steps
    (last.pt at epoch 1, step 3)."""
    from bfly.job.train import main as train_main

    from probes.fault_launch import fault_args

    run = tmp_path / "run"
    assert train_main(fault_args(tiny_data, run, **{"run.stop_after_steps": 3})) == 0
    return run


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Polls `condition` every 0.2 s until it holds or `timeout_s` passed; whether it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"


def local_cluster(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`slurm/local_cluster.sh COMMAND` (up, down, status), output captured."""
    return subprocess.run(["bash", str(LOCAL_CLUSTER), command], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM test cluster: brought up once, for the first test that needs it, and taken down after
    the last test, unless it was already up."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurm/local_cluster.sh starts system daemons)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    was_up = local_cluster("status").returncode == 0
    up = local_cluster("up")
    if up.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not come up:\n{up.stdout[-1500:]}\n{up.stderr[-1500:]}")
    yield
    if not was_up:
        local_cluster("down")


# --- end of training fixtures ---

# --- folder layout (no CSV) fixtures ---


def folder_copy(dst: Path, per_class: dict[str, int] | None = None) -> Path:
    """butterfly-mini in the folder layout without its CSVs: real split and class folders, images linked
    (editable, fast). per_class: keep the first N images of each class folder of a split (default: all)."""
    for split in ("train", "valid", "test"):
        for class_dir in sorted((MINI_ROOT / split).iterdir()):
            (dst / split / class_dir.name).mkdir(parents=True)
            images = sorted(class_dir.iterdir())
            for image in images[: (per_class or {}).get(split, len(images))]:
                (dst / split / class_dir.name / image.name).symlink_to(image)
    return dst


# --- end of folder layout fixtures ---
