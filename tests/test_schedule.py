"""LR schedule (pure function of the step) and optimizer parameter groups."""

import itertools
import math

import pytest
import torch

from bfly.core.config import OptimConfig
from bfly.core.models import resnet50
from bfly.core.optim import build_optimizer, implementation, lr_at, param_groups


def test_linear_warmup_reaches_the_peak_on_the_last_warmup_step():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.0) for s in range(10)]
    assert lrs == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_after_warmup():
    def f(s):
        return lr_at(s, total_steps=110, warmup_steps=10, base_lr=0.4, min_lr=0.0)

    assert f(10) == pytest.approx(0.4)
    assert f(60) == pytest.approx(0.2)  # half way through the cosine
    assert f(35) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.0)
    assert f(500) == pytest.approx(0.0)  # past the end: stays at min_lr


def test_min_lr_floor_and_no_warmup():
    assert lr_at(0, 100, 0, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 0, 1.0, 0.1) == pytest.approx(0.1)


def test_schedule_is_monotonic_after_warmup():
    lrs = [lr_at(s, 200, 20, 0.1, 0.0) for s in range(20, 201)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_no_weight_decay_on_norm_layers_and_biases():
    model = resnet50(num_classes=10)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.bn1.weight) in no_decay_ids and id(model.fc.bias) in no_decay_ids
    assert id(model.conv1.weight) not in no_decay_ids and id(model.fc.weight) not in no_decay_ids
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizers(name, cls):
    opt = build_optimizer(torch.nn.Linear(3, 2), OptimConfig(name=name))
    assert isinstance(opt, cls)
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_on_the_cpu_the_optimizer_steps_all_parameters_with_foreach_kernels(name):
    opt = build_optimizer(torch.nn.Linear(3, 2), OptimConfig(name=name))
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
    assert implementation(name, torch.device("cpu")) == "foreach"
