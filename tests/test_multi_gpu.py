"""Multi-GPU correctness and speed: per-device CUDA RNG in checkpoints,
evaluation without recompiling, static_graph with accumulation, synchronised clocks, fused EMA, and
the PIL path's shared-memory use. What needs CUDA is marked `gpu`; the rest runs on the CPU."""

import copy
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

from bfly.core import checkpoint as ckpt
from bfly.core.config import DistConfig, load_config
from bfly.core.data.inputs import shm_warning
from bfly.core.data.pil_input import PREFETCH_BUDGET, PilTrainInput, batch_bytes, prefetch_factor, shm_bytes
from bfly.core.data.sampling import StepPlan
from bfly.core.ema import ModelEma
from bfly.core.engine import device_clock, evaluate
from bfly.core.models import build_model
from bfly.core.stack import check_ddp_plan

from conftest import read_jsonl, tiny_overrides, torchrun

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- 1. checkpoints hold the CUDA RNG of the rank's own device only ---------------------------------


def draws() -> tuple:
    import random

    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = ckpt.rng_state()
    if torch.cuda.is_available():
        assert isinstance(state["cuda"], torch.Tensor)  # one device's state, not one per visible GPU
    else:
        assert state["cuda"] is None
    ckpt.save_atomic({"rng": state}, tmp_path / "rng.pt")
    expected = draws()
    ckpt.set_rng_state(ckpt.load(tmp_path / "rng.pt")["rng"])
    got = draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_checkpoints_with_one_cuda_state_per_visible_device_still_resume(tmp_path):
    a, b = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    assert ckpt.own_cuda_state([a, b], 1) is b  # the rank's own device
    assert ckpt.own_cuda_state([a], 3) is a  # fewer GPUs were visible when it was saved: the first
    assert ckpt.own_cuda_state([], 0) is None  # saved on a CPU
    assert ckpt.own_cuda_state(a, 2) is a and ckpt.own_cuda_state(None, 0) is None  # the new format
    old = ckpt.rng_state() | {"cuda": []}  # what a CPU run saved before the change
    ckpt.save_atomic({"rng": old}, tmp_path / "old.pt")
    expected = draws()
    ckpt.set_rng_state(ckpt.load(tmp_path / "old.pt")["rng"])
    assert torch.equal(draws()[2], expected[2])


@pytest.mark.gpu
@needs_cuda
def test_cuda_rng_is_restored_on_the_own_device_from_new_and_old_checkpoints(tmp_path):
    state = ckpt.rng_state()
    expected = torch.rand(8, device="cuda")
    old_format = state | {"cuda": [state["cuda"]] * torch.cuda.device_count()}
    for name, saved in (("new", state), ("old", old_format)):
        ckpt.save_atomic({"rng": saved}, tmp_path / f"{name}.pt")
        ckpt.set_rng_state(ckpt.load(tmp_path / f"{name}.pt")["rng"])
        assert torch.equal(torch.rand(8, device="cuda"), expected), name


# --- 3. evaluation never recompiles the compiled training model --------------------------------------


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_evaluating_a_compiled_model_compiles_nothing_and_matches_eager():
    torch._dynamo.reset()
    # backend="eager": dynamo's tracing and recompile rules are the same as inductor's, in a second.
    model = torch.compile(small_bn_net(), backend="eager")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()  # the training graph
    trained = graphs()
    assert trained >= 1
    g = torch.Generator().manual_seed(1)
    # The last batch is smaller, as a split's last batch usually is.
    batches = [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (8, 8, 3)]
    got = evaluate(model, batches, 5, CPU, None)
    assert graphs() == trained, "evaluation compiled new graphs"
    eager = evaluate(model._orig_mod, batches, 5, CPU, None)
    assert got["loss"] == eager["loss"] and torch.equal(got["confusion"], eager["confusion"])
    assert got["count"] == 19
    # What it replaces: running the compiled module in eval/no_grad adds graphs (mode change, last batch).
    with torch.no_grad():
        model.eval()
        for images, _ in batches:
            model(images)
    assert graphs() > trained


@pytest.mark.slow
def test_a_compiled_training_run_never_recompiles(tiny_data, tmp_path):
    """The trainer with model.compile=true (inductor, the test model at 32 px): two epochs with two evaluated
    splits each, under dynamo's error_on_recompile. Evaluating the compiled module instead made 3 graphs."""
    from bfly.job.train import main

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        args = tiny_overrides(
            tiny_data, tmp_path / "run", **{"model.compile": "true", "train.eval_splits": "[valid,test]"}
        )
        assert main(args) == 0
    assert graphs() == 1
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1] and all("test_top1" in r for r in records)


# --- 4. dist.static_graph with gradient accumulation is refused --------------------------------------


@pytest.mark.parametrize("world, micro, ok", [(2, 6, True), (2, 3, False), (4, 1, False), (1, 3, True)])
def test_static_graph_is_refused_with_accumulation_under_ddp(world, micro, ok):
    plan = StepPlan.make(12, world, micro)
    check_ddp_plan(DistConfig(static_graph=False), plan)  # never refused without static_graph
    if ok:
        check_ddp_plan(DistConfig(static_graph=True), plan)
        return
    with pytest.raises(ValueError, match=r"dist\.static_graph=true .* train\.micro_batch_size="):
        check_ddp_plan(DistConfig(static_graph=True), plan)


@pytest.mark.slow  # ~16 s on 2 cores: torchrun and two process-group start-ups
def test_static_graph_with_accumulation_stops_every_rank_with_one_line(tiny_data, tmp_path):
    args = tiny_overrides(tiny_data, tmp_path / "run", **{"dist.static_graph": "true", "train.micro_batch_size": 3})
    result = torchrun(2, "bfly.train", args, timeout=120)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bfly.train: error")]
    assert 1 <= len(lines) <= 2, result.stderr[-3000:]
    for line in lines:
        assert "dist.static_graph=true" in line and "train.micro_batch_size=6" in line, line
    codes = re.findall(r"exitcode\s+: (-?\d+)", result.stderr)
    assert codes and "0" not in codes, result.stderr[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()


# --- 5. clocks read after the device has finished ----------------------------------------------------


def test_device_clock_on_cpu_is_the_plain_clock():
    before = time.perf_counter()
    assert before <= device_clock(CPU) <= time.perf_counter()


@pytest.mark.gpu
@needs_cuda
def test_device_clock_waits_for_queued_cuda_work():
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(50):
        b = a @ a  # ~7 TFLOP in all: long enough to be still queued when the host reads the clock
    device_clock(a.device)
    assert torch.cuda.current_stream().query() and b.shape == a.shape


# --- 6. EMA in fused multi-tensor ops ----------------------------------------------------------------


class LoopEma(ModelEma):
    """The per-tensor update the fused one replaces (parameters averaged, buffers copied)."""

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


@pytest.mark.parametrize("arch", ["resnet50", "vgg19_bn"])
def test_fused_ema_equals_the_per_tensor_update_bit_for_bit(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10)
    fused, loop = ModelEma(model, 0.99), LoopEma(model, 0.99)
    with torch.no_grad():
        for step in range(3):  # a training step's changes: weights, BN statistics, the batch counters
            for i, p in enumerate(model.parameters()):
                p.mul_(1.0 - 0.01 * step).add_(0.001 * i)
            for i, b in enumerate(model.buffers()):
                b.add_(1 if b.dtype == torch.int64 else 0.1 * i + step)
            fused.update(model)
            loop.update(model)
    a, b = fused.state_dict(), loop.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert int(a[next(k for k in a if k.endswith("num_batches_tracked"))]) == 3
    assert not torch.equal(a[next(iter(a))], model.state_dict()[next(iter(a))])  # averaged, not copied


@pytest.mark.gpu
@needs_cuda
def test_fused_ema_on_cuda_equals_the_per_tensor_update():
    model = build_model("resnet50", 10).cuda()
    fused, loop = ModelEma(model, 0.999), LoopEma(model, 0.999)
    with torch.no_grad():
        for step in range(3):
            for p in model.parameters():
                p.mul_(1.0 - 0.01 * step).add_(0.001)
            for b in model.buffers():
                b.add_(1)
            fused.update(model)
            loop.update(model)
    a, b = fused.state_dict(), loop.state_dict()
    for k in a:  # the fused CUDA kernel may round differently from the per-tensor one
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_ema_keeps_working_after_loading_a_checkpoint():
    model = small_bn_net()
    ema = ModelEma(model, 0.5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(2.0)
    ema.load_state_dict(other.state_dict())  # in place: the fused update's tensor lists stay valid
    ema.update(model)
    w = ema.state_dict()["5.weight"]
    assert torch.allclose(w, 0.5 * 2.0 + 0.5 * model[5].weight)


# --- 7. the PIL path's prefetched batches and /dev/shm ------------------------------------------------


def test_prefetch_keeps_a_loaders_batches_under_the_budget_and_at_least_two():
    big = batch_bytes(256, 224)  # 154 MB
    assert big == 256 * 3 * 224 * 224 * 4
    assert prefetch_factor(big, 4) == 2  # 4 x 4 x 154 MB would be 2.4 GB; 2 is the floor (1.2 GB)
    assert prefetch_factor(batch_bytes(64, 224), 4) == 4  # 4 GPUs: 64 per GPU, 616 MB per process
    assert prefetch_factor(batch_bytes(128, 224), 4) == 3
    assert shm_bytes(batch_bytes(128, 224), 4) <= PREFETCH_BUDGET
    assert prefetch_factor(batch_bytes(12, 32), 4) == 4
    assert prefetch_factor(big, 0) is None and shm_bytes(big, 0) == 0


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # workers are never started here
def test_the_train_loader_gets_the_sized_prefetch(mini_root_meta):
    from bfly.core.data.metadata import load_metadata
    from bfly.core.data.transforms import build_eval_transform

    split = load_metadata(mini_root_meta, splits=["train"]).splits["train"]
    inp = PilTrainInput(split, build_eval_transform(224), StepPlan.make(256, 1, 0), 0, 0, CPU, 4, False, 224)
    assert inp.loader.prefetch_factor == 2
    inp = PilTrainInput(split, build_eval_transform(32), StepPlan.make(256, 1, 0), 0, 0, CPU, 4, False, 32)
    assert inp.loader.prefetch_factor == 4


def test_shm_shortage_is_one_warning_with_the_figures():
    cfg = load_config(None, ["data.workers=8"])  # the shipped recipes' workers, at the default 224 px
    plan = StepPlan.make(cfg.train.batch_size, 4, 0)  # 4 GPUs on one node: 64 images each
    need = 4 * shm_bytes(batch_bytes(64, 224), 8)
    assert shm_warning(cfg, plan, 64, 4, free=need) is None
    note = shm_warning(cfg, plan, 64, 4, free=2**30)
    assert "/dev/shm has 1.0 GiB free" in note and f"{need / 2**30:.1f} GiB" in note and "data.workers" in note
    assert shm_warning(cfg, plan, 64, 4, free=None) is None  # no /dev/shm (not Linux)
    cached = load_config(None, ["data.input=cached"])
    assert shm_warning(cached, plan, 64, 4, free=0) is None  # no DataLoader workers on that path
    assert shm_warning(load_config(None, ["data.workers=0"]), plan, 64, 4, free=0) is None
