"""The GPU path, on a CPU: device choice per local rank, CUDA hidden from the CPU tier, cached input
in both placements, backend flags wherever a model runs, and (marker `fakecuda`) what a GPU run
places where, with tensors that say they are on cuda:0 and compute nothing (tests/fakecuda.py)."""

from __future__ import annotations

import pytest
import torch

from bfly.config import ConfigError
from bfly.stack import pick_device
from fakecuda import fake_gpu

from conftest import tiny_overrides

pytestmark = pytest.mark.fakecuda


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
