"""The GPU path, on a CPU: device choice per local rank, CUDA hidden from the CPU tier, cached input
in both placements, backend flags wherever a model runs, and (marker `fakecuda`) what a GPU run
places where, with tensors that say they are on cuda:0 and compute nothing (tests/fakecuda.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytest
import torch

from bfly.core import checkpoint as ckpt, distributed, stack
from bfly.core.config import ConfigError, load_config, to_dict
from bfly.core.data.cached_input import CachedTrainInput, ResidentSplit
from bfly.core.data.metadata import load_metadata
from bfly.core.data.sampling import StepPlan
from bfly.core.engine import evaluate, new_sums
from bfly.core.env import DistEnv
from bfly.core.models.syncbn import SyncBatchNorm2d
from bfly.core.stack import pick_device
from fakecuda import devices, fake_gpu

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
    from bfly.job.train import main as train_main

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
    from bfly.tools.evaluate import main as evaluate_main

    with fake_gpu():
        code = evaluate_main(
            ["--checkpoint", str(trained_run / "best.pt"), "--split", "valid", "--out", str(tmp_path / "r.json")]
        )
    assert code == 0, capsys.readouterr().err
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_predict_on_a_gpu_sets_the_backend_flags(trained_run, capsys):
    from bfly.tools.predict import main as predict_main

    image = next((MINI_ROOT / "test").rglob("*.jpg"))
    with fake_gpu():
        assert predict_main(["--checkpoint", str(trained_run / "best.pt"), str(image)]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark


def test_the_benchmark_trainer_sets_what_training_sets_and_honours_its_cudnn_switch():
    from bfly.tools import throughput

    s = throughput.Settings(batch_size=4, image_size=32, cudnn_benchmark=False)
    with fake_gpu():
        trainer = throughput.make_trainer(throughput.build_ours("resnet50"), torch.device("cuda", 0), s)
    assert next(trainer.model.parameters()).device == torch.device("cuda", 0)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark  # --no-cudnn-benchmark


# --- a GPU run's placements, on a pretend GPU ----------------------------------------------------------
# The backward pass is the one thing faked beyond the tensors: PyTorch's autograd engine needs a real
# CUDA device for CUDA tensors. A fake backward gives each parameter a gradient of its own device and
# dtype, which is what the rest of the step (scaler, clipping, optimizer, EMA, DDP's no_sync) acts on.


def gpu_cfg(*extra: str):
    return load_config(None, ["model.name=resnet50", "data.image_size=32", "train.batch_size=8", *extra])


class FakeDdp(torch.nn.Module):
    """Stands for DistributedDataParallel (which needs a live process group): records how it was built
    and when gradient synchronisation was skipped."""

    built: ClassVar[list[tuple[torch.nn.Module, dict]]] = []

    def __init__(self, module: torch.nn.Module, **kwargs):
        super().__init__()
        self.module, self.kwargs, self.no_sync_calls = module, kwargs, 0
        FakeDdp.built.append((module, kwargs))

    def forward(self, x):
        return self.module(x)

    def no_sync(self):
        self.no_sync_calls += 1
        return contextlib.nullcontext()


@pytest.fixture
def fake_ddp(monkeypatch):
    FakeDdp.built = []
    started = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDdp)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: started.append((backend, kw)))
    return started


def fake_backward(params: list[torch.Tensor]):
    def backward(loss, *args, **kwargs):
        assert loss.device == params[0].device  # the loss lives on the GPU
        for p in params:
            p.grad = torch.ones_like(p) if p.grad is None else p.grad + 1

    return backward


def test_rank_1_of_2_starts_nccl_on_its_gpu_converts_syncbn_before_ddp_and_uses_channels_last(fake_ddp):
    cfg = gpu_cfg()
    env = DistEnv(1, 1, 2, 2, "torchrun", "env://")
    with fake_gpu(count=2) as gpu:
        device = pick_device(env.local_rank, env.local_world_size)
        distributed.init(env, device, "auto", 60)
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, device, sync_bn=True)
        trainer = stack.build_trainer(cfg, raw, device, 10, accum_steps=1, steps_per_epoch=4, ddp=True)
    assert device == torch.device("cuda", 1) and gpu.set_device_calls == [1]
    ((backend, kw),) = fake_ddp
    assert backend == "nccl" and kw["device_id"] == torch.device("cuda", 1) and kw["world_size"] == 2
    ((wrapped, ddp_kw),) = FakeDdp.built
    assert wrapped is raw and ddp_kw["device_ids"] == [1] and trainer.model.module is raw
    bns = [m for m in raw.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, SyncBatchNorm2d) for m in bns)  # converted before DDP saw it
    assert devices(raw.state_dict()) == {"cuda:1"}
    convs = [m.weight for m in raw.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None and trainer.channels_last


def test_a_bf16_train_step_keeps_everything_on_the_gpu_and_updates_the_ema(monkeypatch):
    cfg = gpu_cfg("train.ema_decay=0.9")
    with fake_gpu():
        device = torch.device("cuda", 0)
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, device)
        trainer = stack.build_trainer(cfg, raw, device, 10, accum_steps=1, steps_per_epoch=4, ddp=False)
        params = list(raw.parameters())
        monkeypatch.setattr(torch.Tensor, "backward", fake_backward(params))
        outputs = []
        raw.fc.register_forward_hook(lambda m, i, o: outputs.append(o))
        sums = new_sums(device)
        images = torch.rand(4, 3, 32, 32, device=device)  # as the input path delivers them
        trainer.micro_step(images, torch.zeros(4, dtype=torch.int64, device=device), True, sums)
        trainer.optimizer_step()
    assert outputs[0].dtype == torch.bfloat16 and outputs[0].device == device  # autocast on the GPU
    assert all(p.grad is None for p in params)  # zero_grad(set_to_none) after the step
    assert devices(trainer.optimizer.state_dict()["state"]) == {"cuda:0"}  # momentum buffers
    assert devices(trainer.ema.state_dict()) == {"cuda:0"} and devices(sums) == {"cuda:0"}
    assert not any(p.requires_grad for p in trainer.ema.module.parameters())


def test_fp16_with_gradscaler_clipping_and_accumulation_under_ddp(monkeypatch, fake_ddp):
    cfg = gpu_cfg("train.amp=fp16", "optim.clip_grad_norm=1.0")
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, max_norm):
        clipped.append(list(params))
        return clip(clipped[-1], max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    with fake_gpu():
        device = torch.device("cuda", 0)
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, device, sync_bn=True)
        trainer = stack.build_trainer(cfg, raw, device, 10, accum_steps=2, steps_per_epoch=4, ddp=True)
        params = list(raw.parameters())
        monkeypatch.setattr(torch.Tensor, "backward", fake_backward(params))
        scaled = []
        scale = trainer.scaler.scale
        monkeypatch.setattr(trainer.scaler, "scale", lambda loss: scaled.append(loss) or scale(loss))
        outputs = []
        raw.fc.register_forward_hook(lambda m, i, o: outputs.append(o))
        sums = new_sums(device)
        for sync in (False, True):  # two micro-batches, one optimizer step
            images = torch.rand(4, 3, 32, 32, device=device)
            trainer.micro_step(images, torch.zeros(4, dtype=torch.int64, device=device), sync, sums)
        trainer.optimizer_step()
    assert trainer.amp_dtype == torch.float16 and all(o.dtype == torch.float16 for o in outputs)
    assert trainer.model.no_sync_calls == 1  # the first micro-batch skipped DDP's all-reduce
    assert len(scaled) == 2 and all(loss.device == device for loss in scaled)
    assert len(clipped) == 1 and devices(clipped[0]) == {"cuda:0"}  # after unscale_, before step
    assert devices(trainer.scaler.state_dict()) <= {"cpu"}  # a float scale in the state dict
    assert trainer.scaler._scale.device == device and devices(trainer.optimizer.state_dict()["state"]) == {"cuda:0"}


def test_evaluation_keeps_its_counts_on_the_gpu_until_the_summary():
    cfg = gpu_cfg()
    reduced = []
    with fake_gpu(), mock.patch.object(distributed, "all_reduce_sum", lambda t: reduced.append(t) or t):
        device = torch.device("cuda", 0)
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, device)
        batches = [(torch.rand(4, 3, 32, 32, device=device), torch.zeros(4, dtype=torch.int64, device=device))]
        result = evaluate(raw, batches, 10, device, torch.bfloat16, channels_last=True)
    assert devices(reduced) == {"cuda:0"} and len(reduced) == 3  # confusion, loss, top-5: summed where they are
    assert result["confusion"].device == CPU and result["confusion"].shape == (10, 10)


def test_gpu_augmentation_with_timm_random_erasing_stays_on_the_gpu_in_channels_last(tiny_data, cache_dir):
    cfg = cached_cfg(tiny_data, cache_dir, "device", "data.preset=timm", "data.randaugment=''", "data.reprob=1.0")
    meta = load_metadata(tiny_data)
    erased = []
    with fake_gpu() as gpu:
        train = CachedTrainInput(meta.splits["train"], cfg, StepPlan.make(12, 1, 12), 0, torch.device("cuda", 0))
        erase = train.erase
        train.erase = lambda x: erased.append(x) or erase(x)
        with gpu.host_work():
            index, params = train.epoch_plan(0)
        images, labels = next(train._micro_batches(index, params))
    assert erase is not None and erase.device == torch.device("cuda", 0) and erased  # timm's, on the GPU batch
    assert images.device == torch.device("cuda", 0) and images.dtype == torch.float32
    assert images.shape == (12, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.device == torch.device("cuda", 0)
    assert all(t.device.type == "cpu" for t in gpu.pinned)  # the epoch plan goes up from pinned memory


def test_a_checkpoint_holds_host_tensors_and_the_rank_s_own_gpu_rng_state(monkeypatch):
    cfg = gpu_cfg("train.amp=fp16", "train.ema_decay=0.9")
    with fake_gpu(count=2) as gpu:
        device = pick_device(1, 2)
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, device)
        trainer = stack.build_trainer(cfg, raw, device, 10, accum_steps=1, steps_per_epoch=4, ddp=False)
        params = list(raw.parameters())
        monkeypatch.setattr(torch.Tensor, "backward", fake_backward(params))
        trainer.micro_step(
            torch.rand(2, 3, 32, 32, device=device),
            torch.zeros(2, dtype=torch.int64, device=device),
            True,
            new_sums(device),
        )
        trainer.optimizer_step()
        rng = ckpt.rng_state()
        payload = ckpt.to_host(
            ckpt.last_payload(
                ckpt.identity(to_dict(cfg), [str(i) for i in range(10)], 60, 0, 1, None),
                model=raw.state_dict(),
                optimizer=trainer.optimizer.state_dict(),
                total_steps=4,
                scaler=trainer.scaler.state_dict(),
                ema=trainer.ema.state_dict(),
                step_in_epoch=1,
                best_top1=0.0,
                epoch_sums=new_sums(device),
                rng=[rng],
                world_size=1,
            )
        )
    assert devices(raw.state_dict()) == {"cuda:1"} and devices(payload) == {"cpu"}
    assert gpu.rng_requests == [1] and rng["cuda"].tolist() == [1] * 16  # this rank's GPU only
