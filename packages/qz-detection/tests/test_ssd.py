"""SSD300-VGG16 and SSDLite320-MobileNetV3: torchvision float equality, INT8 on both engines, QAT, ONNX."""

from __future__ import annotations

import pytest
import torch

import qz_core
from qz_core import calibrate, convert

from conftest import assert_fully_supported, assert_matches_torchvision


def test_ssd300_matches_torchvision(tmp_path):
    assert_matches_torchvision("ssd300_vgg16", tmp_path, small=False, score_thresh=0.012)


def test_ssdlite_matches_torchvision(tmp_path):
    assert_matches_torchvision("ssdlite320_mobilenet_v3_large", tmp_path, small=False)


def test_registered_sizes():
    assert qz_core.get_model_spec("ssd300_vgg16").input_size == (300, 300)
    assert qz_core.get_model_spec("ssdlite320_mobilenet_v3_large").input_size == (320, 320)
    assert qz_core.get_model_spec("ssdlite320_mobilenet_v3_large").family == "ssdlite"


def test_ssd300_int8_keeps_only_l2norm_float():
    torch.manual_seed(0)
    model = qz_core.get_model("ssd300_vgg16", quantize=True, backend="x86", activation_observer="minmax")
    calibrate(model, [torch.rand(1, 3, 300, 300)], progress=False)
    int8 = convert(model)
    float_convs = [n for n, m in int8.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert float_convs == []
    assert type(int8.backbone.l2norm_quant).__name__ == "Quantize"
    assert int8.head.classification_head.cat.__class__.__name__ == "QFunctional"


def test_ssdlite_fully_supported(tmp_path):
    result = assert_fully_supported("ssdlite320_mobilenet_v3_large", tmp_path, small=False, size=(320, 320))
    assert result.float_islands == 0


@pytest.mark.zoo
def test_zoo_ssd300_fully_supported(tmp_path):
    result = assert_fully_supported("ssd300_vgg16", tmp_path, small=False, size=(300, 300))
    assert result.float_islands == 1  # the conv4_3 L2Norm, reported, not hidden


def test_ssd300_reports_its_float_island():
    import qz_core

    assert qz_core.count_float_islands(qz_core.get_model("ssd300_vgg16", quantize=True)) == 1  # L2Norm
    assert qz_core.count_float_islands(qz_core.get_model("ssdlite320_mobilenet_v3_large", quantize=True)) == 0
