"""Quantizable SqueezeNet: torchvision parity, full INT8 support, fusion."""

from __future__ import annotations

import pytest
from torch import nn

from qz_core import QzError, count_float_islands, get_model

from conftest import assert_fully_supported, assert_matches_torchvision

VARIANTS = ["squeezenet1_0", "squeezenet1_1"]


def unfused(model: nn.Module) -> list[str]:
    """BatchNorm and ReLU modules left outside torch's fused (intrinsic) modules."""
    inside = set()
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.intrinsic"):
            inside |= {f"{name}.{child}" for child, _ in module.named_modules() if child}
    return [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, nn.ReLU) and n not in inside]


def test_squeezenet1_1_matches_torchvision(tmp_path):
    assert_matches_torchvision("squeezenet1_1", tmp_path)


def test_squeezenet1_1_fully_supported(tmp_path):
    result = assert_fully_supported("squeezenet1_1", tmp_path)
    assert result.float_islands == 0


@pytest.mark.parametrize("is_qat", [False, True])
def test_every_conv_relu_fuses(is_qat):
    model = get_model("squeezenet1_1", quantize=True, is_qat=is_qat)
    assert unfused(model) == []
    assert count_float_islands(model) == 0


def test_version_is_fixed_by_the_builder():
    with pytest.raises(QzError, match="version"):
        get_model("squeezenet1_1", version="1_0")


@pytest.mark.zoo
@pytest.mark.parametrize("name", VARIANTS)
def test_zoo_squeezenet(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)
    assert assert_fully_supported(name, tmp_path).float_islands == 0
