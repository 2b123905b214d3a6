"""Our SyncBatchNorm2d (bfly/core/models/syncbn.py) is BatchNorm2d over the global batch: on 2 and 3
gloo processes its outputs, gradients and running statistics equal plain BatchNorm2d's over all ranks'
images concatenated (float64); compiled, it adds no graph to the model's; a 2-process CPU run with it
resumes bit-identical."""

from __future__ import annotations

import multiprocessing
import queue
import sys
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bfly.core.models import build_model
from bfly.core.models.syncbn import SyncBatchNorm2d, convert_sync_batchnorm

from conftest import free_port, tiny_overrides, torchrun

TOLERANCE = 1e-10
CHANNELS = 5


def spawn(world: int, target: Any, *args: Any, timeout: float = 300) -> list[dict]:
    """`target(rank, world, port, results, *args)` on `world` gloo processes; each rank's result dict."""
    ctx = mp.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, results, *args)) for r in range(world)]
    for p in procs:
        p.start()
    found: list = []
    deadline = time.monotonic() + timeout
    while len(found) < world and time.monotonic() < deadline:
        try:
            found.append(results.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # a rank failed: its traceback is in the output; the others wait for it in vain
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert len(found) == world and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [r for _, r in sorted(found, key=lambda rr: rr[0])]


def start(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def finish(results: Any, rank: int, found: dict) -> None:
    results.put((rank, found))
    # Every rank done before any tears down: gloo aborts a process whose peer closes mid-collective.
    dist.barrier()
    dist.destroy_process_group()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def global_batch(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each rank's images (a different number per rank, mean far from 0) and output gradients."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2 + r, CHANNELS, 4, 3, generator=g, dtype=torch.float64) * 3 + 7 for r in range(world)]
    return xs, [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]


def reference_bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(CHANNELS).double()
    with torch.no_grad():
        bn.weight.normal_(generator=torch.Generator().manual_seed(1))
        bn.bias.normal_(generator=torch.Generator().manual_seed(2))
    return bn


def compare_with_batchnorm(rank: int, world: int, port: int, results: Any, compiled: bool) -> None:
    """Two training steps and one eval pass of SyncBatchNorm2d on this rank's part of the global batch,
    and of BatchNorm2d on all of it; the relative differences."""
    start(rank, world, port)
    xs, gs = global_batch(world)
    ref = reference_bn()
    ours = convert_sync_batchnorm(nn.Sequential(reference_bn()))
    model = torch.compile(ours, backend="aot_eager") if compiled else ours
    every_x = torch.cat(xs).requires_grad_()
    x = xs[rank].clone().requires_grad_()
    for _ in range(2):  # the second step normalizes with updated running statistics in the buffers
        y_ref = ref(every_x)
        (y_ref * torch.cat(gs)).sum().backward()
        y = model(x)
        (y * gs[rank]).sum().backward()
    mine = slice(sum(len(t) for t in xs[:rank]), sum(len(t) for t in xs[: rank + 1]))
    bn = ours[0]
    # Weight and bias gradients are each rank's own part: DDP sums (averages) them like every gradient.
    dw, db = bn.weight.grad.clone(), bn.bias.grad.clone()
    dist.all_reduce(dw)
    dist.all_reduce(db)
    ref.eval(), ours.eval()
    found = {
        "output": rel(y, y_ref[mine]),
        "input gradient": rel(x.grad, every_x.grad[mine]),
        "weight gradient": rel(dw, ref.weight.grad),
        "bias gradient": rel(db, ref.bias.grad),
        "running_mean": rel(bn.running_mean, ref.running_mean),
        "running_var": rel(bn.running_var, ref.running_var),
        "eval output": rel(ours(xs[rank]), ref(xs[rank])),
        "num_batches_tracked": int(bn.num_batches_tracked) - int(ref.num_batches_tracked),
    }
    # momentum=None: the cumulative average over the batches seen
    ref_avg, ours_avg = reference_bn(), convert_sync_batchnorm(nn.Sequential(reference_bn()))[0]
    ref_avg.momentum = ours_avg.momentum = None
    for _ in range(3):
        ref_avg(torch.cat(xs)), ours_avg(xs[rank])
    found["running_var, momentum=None"] = rel(ours_avg.running_var, ref_avg.running_var)
    ours.train()
    try:
        ours(torch.empty(0, CHANNELS, 4, 3, dtype=torch.float64))
    except ValueError as e:
        found["empty"] = str(e)
    finish(results, rank, found)


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_outputs_gradients_and_running_statistics_equal_batchnorm_over_the_global_batch(world):
    for rank, found in enumerate(spawn(world, compare_with_batchnorm, False)):
        empty = found.pop("empty")
        assert found.pop("num_batches_tracked") == 0
        assert all(err <= TOLERANCE for err in found.values()), (rank, found)
        assert empty.startswith("SyncBatchNorm2d: empty input (0, 5, 4, 3) on this rank: every rank needs")


@pytest.mark.slow
def test_compiled_it_still_equals_batchnorm_over_the_global_batch():
    for rank, found in enumerate(spawn(2, compare_with_batchnorm, True)):
        found.pop("empty"), found.pop("num_batches_tracked")
        assert all(err <= TOLERANCE for err in found.values()), (rank, found)


def test_outside_a_process_group_it_is_batchnorm():
    assert not dist.is_initialized()
    ref, ours = reference_bn(), convert_sync_batchnorm(nn.Sequential(reference_bn()))[0]
    x = torch.randn(4, CHANNELS, 3, 3, dtype=torch.float64)
    assert torch.equal(ours(x), ref(x)) and torch.equal(ours.running_var, ref.running_var)


@pytest.mark.parametrize("name", ["resnet50", "vgg19_bn"])
def test_state_dict_keys_and_tensors_are_those_of_the_batchnorm_model(name):
    torch.manual_seed(0)
    plain = build_model(name, 10)
    keys = list(plain.state_dict())
    params = list(plain.parameters())
    synced = convert_sync_batchnorm(plain)
    assert list(synced.state_dict()) == keys
    assert [p is q for p, q in zip(synced.parameters(), params)] == [True] * len(params)  # an optimizer sees them
    bns = [m for m in synced.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is SyncBatchNorm2d for m in bns)
    assert build_model(name, 10).load_state_dict(synced.state_dict()) is not None


class SmallNet(nn.Module):
    """Three conv-BN-ReLU blocks, a model of ours in miniature: the graph question in seconds (ResNet50 and
    VGG19-BN: the slow tier)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3) for c in (3, 8, 8))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(3))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def count_graphs(rank: int, world: int, port: int, results: Any, name: str, ddp: bool) -> None:
    """Dynamo's graph count for one compiled training step of `name`, with BatchNorm2d and with ours."""
    from torch._dynamo.utils import counters

    start(rank, world, port)
    found = {}
    for kind in ("BatchNorm2d", "SyncBatchNorm2d"):
        torch.manual_seed(0)
        model = SmallNet() if name == "small" else build_model(name, 10)
        if kind == "SyncBatchNorm2d":
            model = convert_sync_batchnorm(model)
        if ddp:  # ResNet50's 100 MB of gradients: DDP's optimizer splits the graph at its buckets
            model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
        torch._dynamo.reset()
        counters.clear()
        # backend="eager": dynamo's tracing and graph breaks are the same as inductor's, in seconds.
        torch.compile(model, backend="eager")(torch.randn(2, 3, 32, 32)).sum().backward()
        found[kind] = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    finish(results, rank, found)


@pytest.mark.parametrize(
    ("name", "ddp"),
    [
        pytest.param("small", True, marks=pytest.mark.slow),
        ("small", False),
        pytest.param("resnet50", True, marks=pytest.mark.slow),
        pytest.param("vgg19_bn", False, marks=pytest.mark.slow),
    ],
)
def test_compiled_it_adds_no_graph_and_no_graph_break(name, ddp):
    """(torch's own SyncBatchNorm breaks the graph at every layer: ResNet50 became ~53 graphs.)"""
    for found in spawn(2, count_graphs, name, ddp):
        assert found["SyncBatchNorm2d"] == found["BatchNorm2d"], found
        assert found["BatchNorm2d"][0] == 1
        assert ddp or found["BatchNorm2d"][1] == 0  # DDP's own wrapper adds breaks, to both alike


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on Linux")
def test_a_two_process_cpu_run_with_syncbn_resumes_bit_identical(tiny_data, tmp_path):
    args = {"train.epochs": 1, "model.sync_bn": "true"}
    straight = tmp_path / "straight"
    whole = torchrun(2, "bfly.train", tiny_overrides(tiny_data, straight, **args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "SyncBatchNorm is off" not in whole.stdout
    resumed = tmp_path / "resumed"
    first = torchrun(2, "bfly.train", tiny_overrides(tiny_data, resumed, **args, **{"run.stop_after_steps": 2}))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, "bfly.train", tiny_overrides(tiny_data, resumed, **args))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # SyncBN kept the running statistics of both ranks' images: they moved from their initial values.
    assert not torch.equal(a["bn1.running_var"], torch.ones_like(a["bn1.running_var"]))


def train_under_ddp(rank: int, world: int, port: int, results: Any) -> None:
    """Three optimizer steps of SmallNet with SyncBN under DDP as training wraps it, each rank on its own
    images; every rank's BatchNorm buffers afterwards."""
    from bfly.core.config import load_config
    from bfly.core.stack import wrap_model

    start(rank, world, port)
    torch.manual_seed(0)
    raw = convert_sync_batchnorm(SmallNet())
    model = wrap_model(raw, load_config(None, []), torch.device("cpu"), ddp=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(3):
        model(torch.randn(4, 3, 12, 12, generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # As numpy arrays: they travel by value (a tensor on a queue shares its memory through a handle that
    # this process, gone by then, would have to serve).
    buffers = {k: v.numpy().copy() for k, v in raw.state_dict().items() if k.startswith("bns.")}
    finish(results, rank, {"broadcast_buffers": model.broadcast_buffers, "buffers": buffers})


def test_under_ddp_every_rank_keeps_the_same_running_statistics_without_broadcasting_them():
    first, second = spawn(2, train_under_ddp)
    assert first["broadcast_buffers"] is False and second["broadcast_buffers"] is False
    a = {k: torch.from_numpy(v) for k, v in first["buffers"].items()}
    b = {k: torch.from_numpy(v) for k, v in second["buffers"].items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["bns.0.num_batches_tracked"]) == 3 and not torch.equal(a["bns.0.running_var"], torch.ones(8))
