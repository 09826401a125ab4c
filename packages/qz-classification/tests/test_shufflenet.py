"""ShuffleNetV2: the family contract and fusion levels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qz_classification.models import shufflenet_v2_x0_5
from qz_core import calibrate, convert, set_backend

from conftest import assert_fully_supported, assert_matches_torchvision

ALL = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"]


def test_matches_torchvision(tmp_path):
    assert_matches_torchvision("shufflenet_v2_x0_5", tmp_path)


def test_fully_supported(tmp_path):
    result = assert_fully_supported("shufflenet_v2_x0_5", tmp_path)
    assert result.float_islands == 0


@pytest.mark.parametrize("level", ["blocks", "all"])
def test_fuse_levels(level):
    model = shufflenet_v2_x0_5(quantize=True, backend="qnnpack", fuse_level=level)
    stem_fused = type(model.conv1[0]).__name__ == "ConvReLU2d"
    assert stem_fused == (level == "all")
    assert type(model.stage2[0].branch2[0]).__name__ == "ConvReLU2d"
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False)
    int8 = convert(model)
    set_backend("qnnpack")
    with torch.no_grad():
        out = int8(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_unfused_model_keeps_batchnorm():
    model = shufflenet_v2_x0_5(quantize=True, backend="x86", fuse_level="none")
    assert isinstance(model.conv1[1], nn.BatchNorm2d)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_fully_supported(name, tmp_path):
    result = assert_fully_supported(name, tmp_path)
    assert result.float_islands == 0
