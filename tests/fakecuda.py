"""A pretend GPU for the `fakecuda` test tier: tensors that say they are on cuda:N and compute nothing.

PyTorch's FakeTensorMode gives every tensor made inside it a device, shape, dtype and memory format,
and runs no kernel; `torch.cuda`'s queries (is_available, device_count, mem_get_info, set_device,
events, RNG state, memory statistics) are answered by mocks that record what was asked. Code under
test then takes the same branches it takes on a GPU machine, and a test asserts where every tensor
landed. What this cannot show (numbers, kernels, speed, NCCL, pinned memory itself) is listed in the
README ("What the CPU tests prove about the GPU path, and what only a GPU can").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

aten = torch.ops.aten
# Ops that make the host wait for the device: a value read back, or an output whose size depends on
# the values (CUDA must finish computing them before it can allocate the result).
READ_BACK = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
# Fused optimizer steps update their tensors in place; a fake one has nothing to update.
FUSED_STEPS = {aten._fused_sgd_, aten._fused_adamw_, aten._fused_adam_}


def _device_to_host(func: object, args: tuple, kwargs: dict) -> bool:
    if func is aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        return src.device.type == "cuda" and dst is not None and torch.device(dst).type == "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type == "cuda"
    return False


def _blocking_host_to_device(func: object, args: tuple, kwargs: dict) -> bool:
    """A copy to the device that is not non_blocking: PyTorch then waits for the stream (every queued
    kernel) after queueing it, whatever the source memory."""
    if func is aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        cross = src.device.type == "cpu" and dst is not None and torch.device(dst).type == "cuda"
        return cross and not kwargs.get("non_blocking", False)
    if func is aten.copy_.default:
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return args[0].device.type == "cuda" and args[1].device.type == "cpu" and args[1].numel() > 1 and blocking
    return False


class CpuFakeTensorMode(FakeTensorMode):
    """FakeTensorMode that knows no real device exists, whatever the mocked torch.cuda says: it must
    never try to run a constant on a device (that would initialise CUDA). Every op that would make the
    host wait for the device is recorded in `waits` (its name)."""

    avoid_device_init = True

    def __init__(self, waits: list[str] | None = None) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.waits = [] if waits is None else waits
        # The converter remembers each fake tensor through a weak reference; nn.Module.to() swaps a fake
        # parameter for its moved copy with torch.utils.swap_tensors, which refuses weakly referenced
        # tensors. Forgetting them costs only the memo's speed-up.
        self.fake_tensor_converter.set_tensor_memo = lambda t, v: None  # type: ignore[method-assign]

    def dispatch(self, func, types, args=(), kwargs=None):
        # Reading a value back to the host (loss.item(), counts, GradScaler's inf check) gets 0: a fake
        # tensor has no values, and the code's control flow must not depend on them here.
        kwargs = kwargs or {}
        on_gpu = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda"
        if (on_gpu and (func in READ_BACK or func in DATA_DEPENDENT)) or _device_to_host(func, args, kwargs):
            self.waits.append(str(func))
        elif _blocking_host_to_device(func, args, kwargs):
            self.waits.append(f"{func} to the device")
        if func in READ_BACK:
            return False if args[0].dtype == torch.bool else 0 if not args[0].is_floating_point() else 0.0
        if func.overloadpacket in FUSED_STEPS:
            return None
        return super().dispatch(func, types, args, kwargs)


class FakeEvent:
    """torch.cuda.Event: records are counted, synchronize/query answer at once (nothing runs)."""

    def __init__(self, gpu: FakeGpu, **kwargs: object) -> None:
        self.gpu, self.recorded, self.synchronized = gpu, 0, 0
        gpu.events.append(self)

    def record(self, stream: object = None) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        self.synchronized += 1
        self.gpu.waits.append("Event.synchronize")

    def query(self) -> bool:
        return True

    def wait(self, stream: object = None) -> None:
        pass

    def elapsed_time(self, other: FakeEvent) -> float:
        return 0.0


@dataclass
class FakeGpu:
    """What the mocked torch.cuda was asked; `count` GPUs with `free_bytes` free each."""

    count: int = 1
    free_bytes: int = 140 * 2**30
    current: int = 0
    set_device_calls: list[int] = field(default_factory=list)
    events: list[FakeEvent] = field(default_factory=list)
    rng_requests: list[int] = field(default_factory=list)
    rng_restored: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    pinned: list[torch.Tensor] = field(default_factory=list)  # what Tensor.pin_memory() returned
    waits: list[str] = field(default_factory=list)  # every host wait: ops (CpuFakeTensorMode), synchronize

    def synchronize(self, device: object = None) -> None:
        self.waits.append("torch.cuda.synchronize")

    def pin(self, t: torch.Tensor, device: object = None) -> torch.Tensor:
        # FakeTensorMode has no pin_memory: a copy stands for the pinned one, and is remembered.
        copy = t.clone()
        self.pinned.append(copy)
        return copy

    @staticmethod
    def host_work() -> contextlib.AbstractContextManager:
        """Real tensors again for a while: host-side work whose values matter (an epoch's sample plan is
        CPU work on a GPU machine too; a fake tensor has no values)."""
        return torch._subclasses.fake_tensor.unset_fake_temporarily()

    def set_device(self, device: int | torch.device) -> None:
        index = device.index if isinstance(device, torch.device) else int(device)
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        self.set_device_calls.append(index)
        self.current = index

    def rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        index = device.index if isinstance(device, torch.device) else device
        index = self.current if index in ("cuda", None) else int(index)
        self.rng_requests.append(index)
        # A real CUDA generator state is a uint8 CPU tensor; this one says whose it is.
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            return torch.full((16,), index, dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = device.index if isinstance(device, torch.device) else device
        self.rng_restored.append((self.current if index in ("cuda", None) else int(index), state))


def _deepcopy_fake(t: torch.Tensor, memo: dict) -> torch.Tensor:
    if id(t) not in memo:
        memo[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
    return memo[id(t)]


@contextlib.contextmanager
def fake_gpu(count: int = 1, free_bytes: int = 140 * 2**30, tensors: bool = True) -> Iterator[FakeGpu]:
    """`count` pretend GPUs. tensors=False: only the torch.cuda queries are mocked (no FakeTensorMode)."""
    gpu = FakeGpu(count, free_bytes)
    c = torch.cuda
    patches = [
        mock.patch.object(c, "is_available", lambda: True),
        mock.patch.object(c, "device_count", lambda: gpu.count),
        mock.patch.object(c, "current_device", lambda: gpu.current),
        mock.patch.object(c, "set_device", gpu.set_device),
        mock.patch.object(c, "is_bf16_supported", lambda *a, **k: True),
        mock.patch.object(c, "mem_get_info", lambda device=None: (gpu.free_bytes, 141 * 2**30)),
        mock.patch.object(c, "synchronize", gpu.synchronize),
        mock.patch.object(c, "get_rng_state", gpu.rng_state),
        mock.patch.object(c, "set_rng_state", gpu.set_rng_state),
        mock.patch.object(c, "get_rng_state_all", lambda: [gpu.rng_state(i) for i in range(gpu.count)]),
        mock.patch.object(c, "Event", lambda **kw: FakeEvent(gpu, **kw)),
        mock.patch.object(c, "max_memory_allocated", lambda device=None: 0),
        mock.patch.object(c, "reset_peak_memory_stats", lambda device=None: None),
        mock.patch.object(c, "empty_cache", lambda: None),
        mock.patch.object(c, "get_device_name", lambda device=None: "fake GPU"),
        mock.patch.object(torch.Tensor, "pin_memory", lambda t, device=None: gpu.pin(t)),
        # Tensor.__deepcopy__ (the EMA copies the model) reads data_ptr(), which a fake tensor does not
        # have: PyTorch warns of undefined behaviour, and a later crash followed. A clone is the copy.
        mock.patch.object(FakeTensor, "__deepcopy__", _deepcopy_fake, create=True),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        if tensors:
            stack.enter_context(CpuFakeTensorMode(gpu.waits))
        yield gpu


@contextlib.contextmanager
def process_group(world_size: int = 2) -> Iterator[None]:
    """SyncBatchNorm2d's view of a process group of `world_size` ranks that all hold what this one holds:
    its functional collectives gather `world_size` copies and sum to `world_size` times the tensor.
    Nothing is sent."""
    from bfly.core.models import syncbn

    fc = torch.distributed._functional_collectives
    patches = [
        mock.patch.object(syncbn, "_sync_group", lambda process_group: "pretend group"),
        mock.patch.object(syncbn, "_all_gather", lambda t, dim, group: torch.cat([t] * world_size)),
        mock.patch.object(fc, "all_reduce", lambda t, op, group: t * world_size),
        mock.patch.object(fc, "wait_tensor", lambda t: t),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


def devices(tensors: object) -> set[str]:
    """Every tensor's device in a nested structure (dicts, lists, tuples), as strings."""
    found: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            found.add(str(x.device))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(tensors)
    return found
