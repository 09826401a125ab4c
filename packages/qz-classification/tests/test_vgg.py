"""Quantizable VGG: torchvision parity, full INT8 support, fusion."""

from __future__ import annotations

import pytest
from torch import nn

from qz_core import count_float_islands, get_model

from conftest import assert_fully_supported, assert_matches_torchvision

# The ONNX exporter maps AdaptiveAvgPool2d((7, 7)) only when 7 divides the feature map: 224 input.
INPUT_SIZE = 224
VARIANTS = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def unfused(model: nn.Module) -> list[str]:
    """BatchNorm and ReLU modules left outside torch's fused (intrinsic) modules."""
    inside = set()
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.intrinsic"):
            inside |= {f"{name}.{child}" for child, _ in module.named_modules() if child}
    return [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, nn.ReLU) and n not in inside]


def test_vgg11_matches_torchvision(tmp_path):
    assert_matches_torchvision("vgg11", tmp_path)


def test_vgg11_bn_matches_torchvision(tmp_path):
    assert_matches_torchvision("vgg11_bn", tmp_path)


def test_vgg11_bn_fully_supported(tmp_path):
    result = assert_fully_supported("vgg11_bn", tmp_path, input_size=INPUT_SIZE)
    assert result.float_islands == 0


@pytest.mark.parametrize("is_qat", [False, True])
@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_every_conv_bn_relu_and_linear_relu_fuses(name, is_qat):
    model = get_model(name, quantize=True, is_qat=is_qat, num_classes=10)
    assert unfused(model) == []
    assert count_float_islands(model) == 0


def test_blocks_level_leaves_the_classifier_unfused():
    model = get_model("vgg11", quantize=True, fuse_level="blocks", num_classes=10)
    assert unfused(model) == ["classifier.1", "classifier.4"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", VARIANTS)
def test_zoo_vgg(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)
    assert assert_fully_supported(name, tmp_path, input_size=INPUT_SIZE).float_islands == 0
