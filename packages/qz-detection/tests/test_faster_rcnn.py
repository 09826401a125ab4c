"""Faster R-CNN: torchvision float equality, INT8 on qnnpack too (1x1 max pool as slicing), QAT, ONNX."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from qz_detection.models._common import QuantizableLastLevelMaxPool, upgrade

from conftest import assert_fully_supported, assert_matches_torchvision

ALL = [
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
]


def test_qnnpack_rejects_1x1_max_pool_and_slicing_gives_the_same_values():
    x = torch.randn(1, 4, 9, 7)
    q = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        with pytest.raises(RuntimeError, match="QNNPACK MaxPool"):
            F.max_pool2d(q, kernel_size=1, stride=2)  # why the seeds saw Faster R-CNN fail on qnnpack
        pool = upgrade(LastLevelMaxPool(), QuantizableLastLevelMaxPool)
        (out,), _ = pool([q], [q], [])[0][-1:], None
        assert torch.equal(out.dequantize(), F.max_pool2d(q.dequantize(), 1, 2))
        float_out = pool([x], [x], [])[0][-1]
        assert torch.equal(float_out, F.max_pool2d(x, 1, 2))
    finally:
        torch.backends.quantized.engine = engine


@pytest.mark.parametrize("frozen", [False, True], ids=["batchnorm", "frozen_bn"])
def test_fasterrcnn_resnet50_matches_torchvision(tmp_path, frozen):
    assert_matches_torchvision("fasterrcnn_resnet50_fpn", tmp_path, frozen=frozen)


def test_fasterrcnn_mobilenet_320_frozen_bn_matches_torchvision(tmp_path):
    assert_matches_torchvision(
        "fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path, frozen=True, rpn_score_thresh=0.0, box_score_thresh=0.0
    )


def test_fasterrcnn_mobilenet_320_fully_supported(tmp_path):
    result = assert_fully_supported("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path, size=(160, 160))
    assert result.float_islands == 1  # MultiScaleRoIAlign, reported, not hidden


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_fully_supported(tmp_path, name):
    assert_fully_supported(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL[1:3])
def test_zoo_matches_torchvision(tmp_path, name):
    assert_matches_torchvision(name, tmp_path, frozen="v2" not in name, box_score_thresh=0.0)
