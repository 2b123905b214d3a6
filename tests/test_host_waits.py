"""A GPU step that never waits for the host, on a pretend GPU (tests/fakecuda.py): every op that would
make the host wait for the device (a value read back, a data-dependent output size, a device-to-host
copy, torch.cuda.synchronize, an event wait) is counted while the real assembly (ResNet50 / VGG19-BN,
our SyncBatchNorm2d, DDP, fused optimizers, the engine) trains. The backward pass is faked as in
test_gpu_path (autograd needs a real device): what backward does on a GPU is not counted here."""

from __future__ import annotations

import inspect
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import test_gpu_path
from bfly.core import checkpoint as ckpt, stack
from bfly.core.config import OptimConfig
from bfly.core.data.cached_input import CachedTrainInput
from bfly.core.data.inputs import build_train_input
from bfly.core.data.metadata import load_metadata
from bfly.core.data.sampling import StepPlan
from bfly.core.engine import TrainState, new_sums, train_one_epoch
from bfly.core.env import DistEnv
from bfly.core.optim import build_optimizer
from bfly.core.stopping import StopRequest
from bfly.run.exchange import LogExchange
from bfly.run.health import RankHealth
from bfly.run.loop import Callback, Callbacks
from bfly.run.metrics import EpochRecord, MetricsLog
from bfly.run.phases import Phases
from bfly.run.runlog import RunLog
from bfly.run.stops import JobBudget, StopAgreement
from fakecuda import devices, fake_gpu, process_group
from test_gpu_path import FakeDdp, cached_cfg, fake_backward, gpu_cfg

pytestmark = pytest.mark.fakecuda
GPU = torch.device("cuda", 0)
DDP_PARAMETERS = set(inspect.signature(torch.nn.parallel.distributed.DistributedDataParallel).parameters)
# test_gpu_path's fixtures: the tiny data's decode cache, the DDP and process-group stand-ins
cache_dir, fake_ddp = test_gpu_path.cache_dir, test_gpu_path.fake_ddp


# --- fused optimizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_on_a_gpu_the_optimizer_is_fused_and_an_fp16_step_reads_nothing_back(name):
    with fake_gpu() as gpu:
        model = torch.nn.Linear(3, 2).to(GPU)
        optimizer = build_optimizer(model, OptimConfig(name=name))
        scaler = torch.amp.GradScaler("cuda")
        scaler.scale(model(torch.rand(4, 3, device=GPU)).sum())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        before = len(gpu.waits)
        scaler.unscale_(optimizer)
        scaler.step(optimizer)  # a fused optimizer takes the inf check on the device
        scaler.update()
        waits = gpu.waits[before:]
    assert optimizer.defaults["fused"] is True and not optimizer.defaults.get("foreach")
    assert waits == []


def test_a_non_fused_optimizer_makes_gradscaler_read_the_inf_check_back():
    """What fused removes: GradScaler.step asks a plain optimizer's step whether to run (.item())."""
    with fake_gpu() as gpu:
        model = torch.nn.Linear(3, 2).to(GPU)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
        scaler = torch.amp.GradScaler("cuda")
        scaler.scale(model(torch.rand(4, 3, device=GPU)).sum())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        scaler.unscale_(optimizer)
        before = len(gpu.waits)
        scaler.step(optimizer)
        assert gpu.waits[before:] == ["aten._local_scalar_dense.default"]


# --- DDP settings -----------------------------------------------------------------------------------


def test_ddp_broadcasts_no_buffers_with_syncbn_and_keeps_gradients_in_its_buckets(fake_ddp):
    cfg = gpu_cfg()
    with fake_gpu():
        for sync_bn in (True, False):
            raw = stack.place_model(stack.init_model(cfg, 10), cfg, GPU, sync_bn=sync_bn)
            stack.build_trainer(cfg, raw, GPU, 10, accum_steps=1, steps_per_epoch=4, ddp=True)
    (_, synced), (_, plain) = FakeDdp.built
    key = "forward_sync_buffers" if "forward_sync_buffers" in DDP_PARAMETERS else "broadcast_buffers"
    assert synced[key] is False  # SyncBN keeps every rank's statistics in step
    assert key not in plain  # per-rank BatchNorm: rank 0's statistics before each forward, as before
    assert synced["gradient_as_bucket_view"] is True and synced["device_ids"] == [0]
    assert set(synced) <= DDP_PARAMETERS  # only what this torch's DDP takes


# --- zero host waits on an ordinary step ------------------------------------------------------------


def pil_batches(tiny_data, cfg, gpu):
    meta = load_metadata(tiny_data)
    train = build_train_input(cfg, meta, StepPlan.make(cfg.train.batch_size, 1, 0), 0, GPU)
    with gpu.host_work():  # decoding and augmentation are host work; the batches are pinned
        host = [(x.pin_memory(), y.pin_memory()) for x, y in train.loader]
    return [(x.to(GPU, non_blocking=True), y.to(GPU, non_blocking=True)) for x, y in host]


def cached_batches(tiny_data, cache, cfg, gpu):
    meta = load_metadata(tiny_data)
    train = CachedTrainInput(meta.splits["train"], cfg, StepPlan.make(cfg.train.batch_size, 1, 0), 0, GPU)
    assert train.store.placement == "device"
    with gpu.host_work():
        index, params = train.epoch_plan(0)
    return train._micro_batches(index, params)


def test_the_pretend_gpu_counts_copies_that_wait_and_not_those_that_do_not():
    with fake_gpu() as gpu:
        on_gpu = torch.zeros(3, device=GPU)
        on_gpu.cpu()  # a read-back
        torch.ones(3).to(GPU)  # queued, then PyTorch waits for the stream
        on_gpu.copy_(torch.ones(3))  # the same
        torch.ones(3).pin_memory().to(GPU, non_blocking=True)  # queued: no wait
        on_gpu[0] = 1.0  # a fill with a Python number: no copy
        torch.cuda.synchronize()
    assert gpu.waits == [
        "aten._to_copy.default",
        "aten._to_copy.default to the device",
        "aten.copy_.default to the device",
        "torch.cuda.synchronize",
    ]


class Marks(Callback):
    """Where each step ends in the list of host waits (the last component: after every other's hook)."""

    def __init__(self, gpu):
        self.gpu, self.steps = gpu, []

    def on_step(self, state: TrainState) -> None:
        self.steps.append(len(self.gpu.waits))


def log_point_components(trainer, gpu, tmp_path, cfg) -> list[Callback]:
    """The components a 2-rank run calls at its epoch starts, steps and log points (not the epoch's end,
    evaluation or checkpoints: those wait by design), each real; the run around them a stand-in."""
    env = DistEnv(0, 0, 2, 2, "torchrun", "env://")
    run = SimpleNamespace(
        cfg=cfg,
        env=env,
        device=GPU,
        trainer=trainer,
        train_input=SimpleNamespace(steps_per_epoch=5),
        plan=SimpleNamespace(batch_size=cfg.train.batch_size),
        log=RunLog(tmp_path, is_main=True),
    )
    phases = Phases()
    health = RankHealth(trainer.model, env, GPU, ["node-a", "node-b"])
    agreement = StopAgreement(StopRequest(), env, GPU, phases)
    return [
        EpochRecord(run, phases),
        LogExchange(env, GPU, phases, [agreement, health]),
        health,
        JobBudget(0, 0, 0, 0),
        agreement,
        MetricsLog(run),
        Marks(gpu),
    ]


def waits_per_step(name: str, amp: str, source: str, tiny_data, cache, monkeypatch, tmp_path) -> dict:
    """Host waits of one epoch of the real engine and the run's components on a pretend 2-rank GPU run: at
    the epoch's start, per ordinary step, at each log point (every 3rd step)."""
    extra = [f"model.name={name}", f"train.amp={amp}", "train.batch_size=12", "data.workers=0", "train.log_every=3"]
    cfg = cached_cfg(tiny_data, cache, "device", *extra) if source == "cached" else gpu_cfg(*extra)
    with fake_gpu() as gpu, process_group(2):
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, GPU, sync_bn=True)
        trainer = stack.build_trainer(cfg, raw, GPU, 10, accum_steps=1, steps_per_epoch=5, ddp=True)
        monkeypatch.setattr(torch.Tensor, "backward", fake_backward(list(raw.parameters())))
        batches = cached_batches(tiny_data, cache, cfg, gpu) if source == "cached" else pil_batches(tiny_data, cfg, gpu)
        components = Callbacks(log_point_components(trainer, gpu, tmp_path, cfg))
        forwards: list[int] = []
        raw.register_forward_pre_hook(lambda module, args: forwards.append(len(gpu.waits)))
        state = TrainState(sums=new_sums(GPU))
        start = len(gpu.waits)
        components.on_epoch_start(state)
        train_one_epoch(trainer, state, batches, components.step_hooks(cfg.train.log_every))
    kinds = [isinstance(m, stack.SyncBatchNorm2d) for m in raw.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert kinds and all(kinds) and False in trainer.model.kwargs.values()  # no buffer sync
    ends = components.all[-1].steps
    steps = [Counter(gpu.waits[a:b]) for a, b in zip([forwards[0], *ends], ends, strict=False)]
    return {
        "epoch start": Counter(gpu.waits[start : forwards[0]]),
        "ordinary": [c for i, c in enumerate(steps) if (i + 1) % 3],
        "log": [c for i, c in enumerate(steps) if (i + 1) % 3 == 0],
        "steps": len(steps),
    }


@pytest.mark.parametrize("source", ["cached", "pil"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["resnet50", "vgg19_bn"])
def test_an_ordinary_step_never_waits_for_the_gpu_and_a_log_point_once(
    name, amp, source, tiny_data, cache_dir, fake_ddp, monkeypatch, tmp_path
):
    found = waits_per_step(name, amp, source, tiny_data, cache_dir, monkeypatch, tmp_path)
    print(
        f"{name} {amp} {source}: host waits at the epoch start {dict(found['epoch start'])}, "
        f"per log point {[dict(c) for c in found['log']]}, per ordinary step {[sum(c.values()) for c in found['ordinary']]}"
    )
    assert found["steps"] == 5 and len(found["ordinary"]) == 4
    assert all(not c for c in found["ordinary"])
    assert found["epoch start"] == Counter()
    # One read-back of the log point's table (running sums, stop flag, health's rows); the clock starts after it.
    assert found["log"] == [Counter({"aten._to_copy.default": 1})]


# --- checkpoints: one device-to-host copy per save ----------------------------------------------------


def test_a_checkpoint_leaves_the_gpu_in_one_copy_and_one_wait_through_a_reused_pinned_buffer(monkeypatch):
    cfg = gpu_cfg("train.amp=fp16")
    with fake_gpu() as gpu:
        spy = test_gpu_path.Spy(monkeypatch)
        raw = stack.place_model(stack.init_model(cfg, 10), cfg, GPU)
        trainer = stack.build_trainer(cfg, raw, GPU, 10, accum_steps=1, steps_per_epoch=4, ddp=False)
        monkeypatch.setattr(torch.Tensor, "backward", fake_backward(list(raw.parameters())))
        sums = new_sums(GPU)
        trainer.micro_step(
            torch.rand(2, 3, 32, 32, device=GPU), torch.zeros(2, dtype=torch.int64, device=GPU), True, sums
        )
        trainer.optimizer_step()
        weights = raw.state_dict()
        state = {"model": weights, "optimizer": trainer.optimizer.state_dict(), "sums": sums, "best": weights}
        on_gpu = [t for t in ckpt._tensors(state, {}).values() if t.device.type == "cuda"]
        staging, saves = ckpt.HostStaging(), []
        for _ in range(2):
            before = len(gpu.waits)
            host = staging.to_host(state)
            saves.append((Counter(gpu.waits[before:]), staging.buffer))
        per_tensor = len(gpu.waits)
        ckpt._rebuild(state, {id(t): t.to("cpu") for t in ckpt._tensors(state, {}).values()})  # the old way
        old = Counter(gpu.waits[per_tensor:])
    copy = "aten.copy_.default"
    print(
        f"device-to-host copies per save: {old['aten._to_copy.default']} tensor by tensor, {saves[0][0][copy]} staged"
    )
    assert old == Counter({"aten._to_copy.default": len(on_gpu)}) and len(on_gpu) > 300
    assert saves[0][0] == saves[1][0] == Counter({copy: 1, "Event.synchronize": 1})
    assert saves[0][1] is saves[1][1] and spy.pinned == [saves[0][1]]  # one pinned buffer, reused
    assert devices(host) == {"cpu"}
    assert host["best"]["conv1.weight"] is host["model"]["conv1.weight"]  # best.pt's weights: the same copy
