"""The GPU path, on a CPU: device choice per local rank, CUDA hidden from the CPU tier, cached input
in both placements, backend flags wherever a model runs, and (marker `fakecuda`) what a GPU run
places where, with tensors that say they are on cuda:0 and compute nothing (tests/fakecuda.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bfly.config import ConfigError, load_config
from bfly.data.cached_input import CachedTrainInput, ResidentSplit
from bfly.data.metadata import load_metadata
from bfly.data.sampling import StepPlan
from bfly.stack import pick_device
from fakecuda import fake_gpu

from conftest import MINI_ROOT, tiny_overrides

pytestmark = pytest.mark.fakecuda
CPU = torch.device("cpu")


# --- one process per GPU ---------------------------------------------------------------------------


def test_each_local_rank_gets_its_own_gpu():
    with fake_gpu(count=4, tensors=False) as gpu:
        assert [pick_device(r, 4) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
        assert gpu.set_device_calls == [0, 1, 2, 3]
        assert pick_device() == torch.device("cuda", 3)  # no rank: the current device, unchanged
        assert pick_device(0, 2) == torch.device("cuda", 0)  # fewer processes than GPUs: fine


def test_more_processes_than_gpus_is_one_line_naming_both_numbers_and_the_fix():
    with fake_gpu(count=1, tensors=False) as gpu, pytest.raises(ConfigError) as e:
        pick_device(1, 2)
    assert str(e.value).startswith("2 processes on this node but 1 visible GPU(s): one process per GPU")
    assert "torchrun --nproc_per_node=1" in str(e.value) and "CUDA_VISIBLE_DEVICES" in str(e.value)
    assert gpu.set_device_calls == []  # refused before any rank could share a GPU


def test_bfly_train_refuses_two_ranks_on_one_gpu_before_nccl_starts(tiny_data, tmp_path, monkeypatch, capsys):
    from bfly.train import main as train_main

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    nccl = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: nccl.append(k))
    with fake_gpu(count=1, tensors=False):
        code = train_main(tiny_overrides(tiny_data, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and nccl == []
    assert "bfly.train: error [rank 0]: 2 processes on this node but 1 visible GPU(s)" in err
    assert "Traceback" not in err


# --- cached input on a GPU: both placements ----------------------------------------------------------


def cached_cfg(data: Path, cache: Path, placement: str, *extra: str):
    overrides = tiny_overrides(data, cache.parent / "run", **{"data.input": "cached"})
    return load_config(None, [*overrides, f"data.cache_dir={cache}", f"data.cache_placement={placement}", *extra])


class Spy:
    """Records pinned host allocations and host-to-device copies, then lets them happen."""

    def __init__(self, monkeypatch):
        self.pinned: list[torch.Tensor] = []
        self.copies: list[tuple[torch.Tensor, torch.device, bool]] = []
        empty, to = torch.empty, torch.Tensor.to

        def spy_empty(*args, **kwargs):
            t = empty(*args, **kwargs)
            if kwargs.get("pin_memory"):
                self.pinned.append(t)
            return t

        def spy_to(t, *args, **kwargs):
            moved = to(t, *args, **kwargs)
            if t.device.type == "cpu" and moved.device.type == "cuda":
                self.copies.append((t, moved.device, kwargs.get("non_blocking", False)))
            return moved

        monkeypatch.setattr(torch, "empty", spy_empty)
        monkeypatch.setattr(torch.Tensor, "to", spy_to)

    def from_pinned(self, t: torch.Tensor) -> bool:
        return any(t is b or t._base is b for b in self.pinned)

    def pinned_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.pinned)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_data) -> Path:
    """The tiny data's decode cache at 32 px, built once (on the CPU, outside any fake mode)."""
    cache = tmp_path_factory.mktemp("gpu-path") / "cache"
    cfg = cached_cfg(tiny_data, cache, "auto")
    meta = load_metadata(tiny_data)
    for split in ("train", "valid"):
        ResidentSplit(meta.splits[split], cfg.data, CPU)
    return cache


def test_host_placement_stages_micro_batches_through_reused_pinned_buffers(tiny_data, cache_dir, monkeypatch):
    """Per rank, pinned host memory is two micro-batches, not a private copy of the split."""
    cfg = cached_cfg(tiny_data, cache_dir, "host", "train.batch_size=12", "train.micro_batch_size=4")
    meta = load_metadata(tiny_data)
    plan = StepPlan.make(12, 1, 4)
    with fake_gpu() as gpu:
        spy = Spy(monkeypatch)
        train = CachedTrainInput(meta.splits["train"], cfg, plan, 0, torch.device("cuda", 0))
        assert train.store.placement == "host" and spy.pinned == []  # the split stays in the mapped file
        images = []
        for epoch in (0, 1):
            with gpu.host_work():
                index, params = train.epoch_plan(epoch)
            images += [x for x, _ in train._micro_batches(index, params)]
    split_bytes = len(meta.splits["train"].paths) * 32 * 32 * 3
    micro_batch_bytes = 4 * 32 * 32 * 3
    assert len(images) == 2 * 15 and all(x.device == torch.device("cuda", 0) for x in images)
    assert len(spy.pinned) == 2 and spy.pinned_bytes() == 2 * micro_batch_bytes < split_bytes
    staged = [(src, dev, nb) for src, dev, nb in spy.copies if spy.from_pinned(src)]
    assert len(staged) == len(images)  # every micro-batch: one copy from a staging buffer ...
    assert all(dev == torch.device("cuda", 0) and non_blocking for _, dev, non_blocking in staged)  # ... async
    # After each copy an event is recorded; a buffer's next use waits for it first.
    assert len(gpu.events) == len(images) and all(e.recorded == 1 for e in gpu.events)
    assert sum(e.synchronized for e in gpu.events) == len(images) - 2


def test_device_placement_keeps_the_split_on_the_gpu_and_gathers_there(tiny_data, cache_dir, monkeypatch):
    cfg = cached_cfg(tiny_data, cache_dir, "auto")
    meta = load_metadata(tiny_data)
    with fake_gpu(free_bytes=2**30):
        spy = Spy(monkeypatch)
        # torch.device("cuda") without an index is the current GPU: the split is resident there.
        store = ResidentSplit(meta.splits["valid"], cfg.data, torch.device("cuda"))
        index = torch.tensor([3, 1, 4])
        batch = store.gather(index, index.to(store.device))
    assert store.placement == "device" and store.images.device == torch.device("cuda", 0)
    assert batch.device == torch.device("cuda", 0) and batch.shape == (3, 32, 32, 3)
    assert spy.pinned == []  # no host staging on the device path


def test_auto_placement_keeps_a_split_larger_than_a_quarter_of_free_memory_on_the_host(tiny_data, cache_dir):
    cfg = cached_cfg(tiny_data, cache_dir, "auto")
    meta = load_metadata(tiny_data)
    split_bytes = len(meta.splits["valid"].paths) * 32 * 32 * 3
    with fake_gpu(free_bytes=4 * split_bytes - 1):
        assert ResidentSplit(meta.splits["valid"], cfg.data, torch.device("cuda", 0)).placement == "host"
    with fake_gpu(free_bytes=4 * split_bytes):
        assert ResidentSplit(meta.splits["valid"], cfg.data, torch.device("cuda", 0)).placement == "device"


# --- backend flags wherever a model runs --------------------------------------------------------------


def test_evaluate_on_a_gpu_sets_the_backend_flags_training_evaluated_with(trained_run, tmp_path, capsys):
    """bfly.evaluate's numbers match training's own evaluation only with training's kernels (TF32,
    cudnn.benchmark): the command sets them as training does."""
    from bfly.evaluate import main as evaluate_main

    with fake_gpu():
        code = evaluate_main(
            ["--checkpoint", str(trained_run / "best.pt"), "--split", "valid", "--out", str(tmp_path / "r.json")]
        )
    assert code == 0, capsys.readouterr().err
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_predict_on_a_gpu_sets_the_backend_flags(trained_run, capsys):
    from bfly.predict import main as predict_main

    image = next((MINI_ROOT / "test").rglob("*.jpg"))
    with fake_gpu():
        assert predict_main(["--checkpoint", str(trained_run / "best.pt"), str(image)]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark


def test_the_benchmark_trainer_sets_what_training_sets_and_honours_its_cudnn_switch():
    from bfly import throughput

    s = throughput.Settings(batch_size=4, image_size=32, cudnn_benchmark=False)
    with fake_gpu():
        trainer = throughput.make_trainer(throughput.build_ours("resnet50"), torch.device("cuda", 0), s)
    assert next(trainer.model.parameters()).device == torch.device("cuda", 0)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark  # --no-cudnn-benchmark
