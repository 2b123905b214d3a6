# --- data metadata / transforms fixtures (suffix _meta / _tf) ---
import shutil
from pathlib import Path

import pytest

MINI_ROOT = Path(__file__).resolve().parent.parent / "data" / "butterfly-mini"


@pytest.fixture
def mini_root_meta() -> Path:
    """The committed butterfly-mini dataset (both CSV layouts); never modify it."""
    return MINI_ROOT


@pytest.fixture
def mini_copy_meta(tmp_path: Path) -> Path:
    """An editable butterfly-mini: copied CSVs, image folders linked rather than copied (fast)."""
    root = tmp_path / "butterfly-mini"
    root.mkdir()
    for csv_file in MINI_ROOT.glob("*.csv"):
        shutil.copy(csv_file, root / csv_file.name)
    for split in ("train", "valid", "test"):
        (root / split).symlink_to(MINI_ROOT / split, target_is_directory=True)
    return root


# --- end of data metadata / transforms fixtures ---

# --- training fixtures (lead) ---
import json
import os
import socket
import subprocess
import sys

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_subset(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """A course-layout copy of the mini data with `per_class[split]` images per class (images linked)."""
    import pandas as pd

    dst.mkdir(parents=True, exist_ok=True)
    for split, n in per_class.items():
        df = pd.read_csv(src / f"{split}.csv")
        df = df.sort_values("filepaths").groupby("label_id", sort=True).head(n)
        df.to_csv(dst / f"{split}.csv", index=False)
        if not (dst / split).exists():
            (dst / split).symlink_to(src / split, target_is_directory=True)
    return dst


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """60 train / 20 valid / 20 test images of the 10 mini species: fast CPU training runs."""
    return write_subset(MINI_ROOT, tmp_path_factory.mktemp("tiny") / "data", {"train": 6, "valid": 2, "test": 2})


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "data.root": str(data), "data.image_size": 32, "data.workers": 0, "model.name": "resnet50",
        "train.epochs": 2, "train.batch_size": 12, "train.log_every": 1, "optim.lr": 0.05,
        "optim.warmup_epochs": 1, "wandb.mode": "disabled", "run.dir": str(run_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}, **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(nproc: int, module: str, args: list[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, **popen)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
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
