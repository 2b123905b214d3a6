"""Our ResNet-50 / VGG-19 against torchvision's reference implementations; resnet_tiny against ResNet-50."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from bfly.core.models import MODEL_NAMES, build_model, resnet50, resnet_tiny
from bfly.core.models.resnet import Bottleneck, ResNet

NUM_CLASSES = 100
PARAM_COUNTS = {"resnet50": 23_712_932, "vgg19": 139_979_940, "vgg19_bn": 139_990_948}
TORCHVISION_MODELS = ("resnet50", "vgg19", "vgg19_bn")  # resnet_tiny has no torchvision twin
# ResNet needs a few pixels to survive its /32 downsampling; VGG's adaptive avgpool accepts 32x32.
INPUT_SIZE = {"resnet50": 64, "vgg19": 32, "vgg19_bn": 32}


def _perturb_zero_initialised(model: nn.Module, gen: torch.Generator) -> None:
    """Give biases and BN statistics non-trivial values so the comparison exercises them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, 0.01, generator=gen)


@pytest.fixture(scope="module", params=TORCHVISION_MODELS)
def pair(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    """(name, ours, torchvision's), ours holding torchvision's weights; one VGG pair alive at a time."""
    name = request.param
    gen = torch.Generator().manual_seed(0)
    # Skipping VGG's own init saves seconds; the weights are random either way and get perturbed below.
    skip_init = {} if name == "resnet50" else {"init_weights": False}
    reference = getattr(torchvision.models, name)(num_classes=NUM_CLASSES, **skip_init)
    _perturb_zero_initialised(reference, gen)
    ours = build_model(name, NUM_CLASSES)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return name, ours, reference


def _input(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    size = INPUT_SIZE[name]
    return torch.randn(2, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))


def test_parameter_count_for_100_classes(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, ours, _ = pair
    assert sum(p.numel() for p in ours.parameters()) == PARAM_COUNTS[name]


def test_matches_torchvision_outputs_in_float64(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, ours, reference = pair
    ours.load_state_dict(reference.state_dict(), strict=True)  # undo BN-statistics updates by training tests
    # float64 so that any difference is a real one, not rounding; float32 -> float64 -> float32 is exact.
    ours.double().eval()
    reference.double().eval()
    try:
        with torch.no_grad():
            x = _input(name, torch.float64)
            got, want = ours(x), reference(x)
    finally:
        ours.float()
        reference.float()
    assert got.shape == (2, NUM_CLASSES)
    assert want.std() > 1e-3, "reference output is degenerate; the comparison would prove nothing"
    torch.testing.assert_close(got, want, rtol=0.0, atol=1e-10)


def test_every_parameter_gets_a_finite_gradient(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, ours, _ = pair
    ours.train()
    ours.zero_grad(set_to_none=True)
    ours(_input(name)).logsumexp(dim=1).sum().backward()
    try:
        for pname, p in ours.named_parameters():
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    finally:
        ours.zero_grad(set_to_none=True)  # VGG's gradients take ~0.5 GiB


def test_channels_last_input_gives_same_output(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, ours, _ = pair
    # float64, so that a difference is a layout bug, not float32 rounding (which grows with the BN statistics
    # that earlier tests of this module leave in the shared model).
    ours.double().eval()
    x = _input(name, torch.float64)
    try:
        with torch.no_grad():
            nchw = ours(x)
            nhwc = ours(x.contiguous(memory_format=torch.channels_last))
    finally:
        ours.float()
    torch.testing.assert_close(nhwc, nchw)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_is_batch_by_num_classes(batch: int) -> None:
    model = resnet50(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(batch, 3, 64, 64)).shape == (batch, 7)


def test_resnet_init_kaiming_fan_out_and_unit_batch_norm() -> None:
    torch.manual_seed(0)
    model = resnet50(num_classes=NUM_CLASSES)
    conv = model.layer4[0].conv2  # 512 x 512 x 3 x 3: enough samples for a tight std estimate
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.02)
    for pname, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), pname


def test_zero_init_residual_zeros_only_last_bn_of_each_block() -> None:
    model = resnet50(num_classes=NUM_CLASSES, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    for block in blocks:
        assert torch.all(block.bn3.weight == 0)
        assert torch.all(block.bn2.weight == 1)
    assert torch.all(resnet50(num_classes=NUM_CLASSES).layer1[0].bn3.weight == 1)


def test_downsample_shortcut_only_where_shape_changes() -> None:
    model = resnet50(num_classes=NUM_CLASSES)
    for layer, stride in [(model.layer1, 1), (model.layer2, 2), (model.layer3, 2), (model.layer4, 2)]:
        first = layer[0]
        assert isinstance(first.downsample, nn.Sequential)
        assert first.downsample[0].stride == (stride, stride)
        assert first.conv2.stride == (stride, stride) and first.conv1.stride == (1, 1)  # v1.5
        assert all(block.downsample is None for block in layer[1:])


@pytest.fixture(scope="module")
def fresh_vgg19_bn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vgg19_bn", num_classes=10, dropout=0.3)


def test_vgg_init_like_torchvision(fresh_vgg19_bn: nn.Module) -> None:
    convs = [m for m in fresh_vgg19_bn.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in fresh_vgg19_bn.classifier if isinstance(m, nn.Linear)]
    assert len(convs) == 16 and len(linears) == 3
    assert convs[-1].weight.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.02)
    assert linears[0].weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert all(torch.all(m.bias == 0) for m in convs + linears)
    assert all(torch.all(m.weight == 1) for m in fresh_vgg19_bn.features if isinstance(m, nn.BatchNorm2d))


def test_build_model_forwards_num_classes_and_keywords(fresh_vgg19_bn: nn.Module) -> None:
    assert fresh_vgg19_bn.classifier[-1].out_features == 10
    assert [m.p for m in fresh_vgg19_bn.classifier if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    resnet = build_model("resnet50", num_classes=5, zero_init_residual=True)
    assert resnet.fc.out_features == 5
    assert torch.all(resnet.layer4[2].bn3.weight == 0)


def test_build_model_rejects_unknown_name_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet18") as excinfo:
        build_model("resnet18", num_classes=10)
    for name in MODEL_NAMES:
        assert name in str(excinfo.value)


# --- resnet_tiny: ResNet-50's network, cut down for quick try-outs and the plumbing tests ---


def test_resnet_tiny_is_a_registered_resnet_of_bottleneck_blocks() -> None:
    assert "resnet_tiny" in MODEL_NAMES
    model = build_model("resnet_tiny", num_classes=NUM_CLASSES, zero_init_residual=True)
    assert type(model) is ResNet
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 4  # one per stage
    assert all(torch.all(block.bn3.weight == 0) for block in blocks)
    assert [layer[0].conv2.out_channels for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        4,
        8,
        16,
        32,
    ]


def test_resnet_tiny_parameter_count() -> None:
    assert sum(p.numel() for p in resnet_tiny(num_classes=NUM_CLASSES).parameters()) == 45_896
    assert sum(p.numel() for p in resnet_tiny(num_classes=10).parameters()) == 34_286


def test_resnet_tiny_state_dict_keys_are_resnet50_keys_of_each_stage_first_block() -> None:
    """The same naming contract as resnet50 (torchvision's names): conv1, bn1, layerN.0.*, fc."""
    tiny = resnet_tiny(num_classes=NUM_CLASSES).state_dict()
    first_blocks = {
        key: tensor.shape
        for key, tensor in resnet50(num_classes=NUM_CLASSES).state_dict().items()
        if not key.startswith("layer") or key.split(".")[1] == "0"
    }
    assert list(tiny) == list(first_blocks)
    assert tiny["layer4.0.conv3.weight"].shape == (128, 32, 1, 1)
    assert tiny["fc.weight"].shape == (NUM_CLASSES, 128)


@pytest.mark.parametrize(("batch", "size"), [(1, 32), (3, 64), (2, 224)])
def test_resnet_tiny_output_shape_is_batch_by_num_classes(batch: int, size: int) -> None:
    model = resnet_tiny(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(batch, 3, size, size)).shape == (batch, 7)


def test_resnet_tiny_every_parameter_gets_a_finite_gradient() -> None:
    model = resnet_tiny(num_classes=NUM_CLASSES).train()
    model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_a_resnet_tiny_run_writes_checkpoints_well_under_1_mb(trained_run) -> None:
    from bfly.core.checkpoint import load

    for name in ("last.pt", "best.pt"):
        assert load(trained_run / name)["arch"] == "resnet_tiny"
        assert (trained_run / name).stat().st_size < 500_000, name
