"""MobileNetV2 and MobileNetV3: the family contract, and INT8 parity with torchvision's quantizable models."""

from __future__ import annotations

import pytest
import torch
import torch.ao.quantization as tq
import torchvision
from torch import nn

from qz_classification.models import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small
from qz_core import calibrate, convert, estimate_bn_stats, set_backend

from conftest import assert_fully_supported, assert_matches_torchvision

ALL = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_fully_supported(name, tmp_path):
    result = assert_fully_supported(name, tmp_path)
    assert result.float_islands == 0


def _torchvision_int8(name: str, state: dict, batches: list[torch.Tensor]) -> nn.Module:
    model = getattr(torchvision.models.quantization, name)(quantize=False)
    model.load_state_dict(state)
    model.eval().fuse_model(is_qat=False)
    set_backend("x86")
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return tq.convert(model)


@pytest.mark.parametrize("builder", [mobilenet_v2, mobilenet_v3_large], ids=lambda b: b.__name__)
@torch.no_grad()
def test_int8_matches_torchvision_quantized(builder, tmp_path):
    """Same float weights, calibration batches and backend: qz's INT8 output is torchvision's (within one step).

    torchvision quantizes a fused conv-bn-ReLU6 as conv-bn-ReLU: qz's ``relu6='relu'``.
    """
    name = builder.__name__
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 64, 64, generator=generator) for _ in range(2)]
    float_model = torchvision.models.get_model(name)
    estimate_bn_stats(float_model, batches)
    torch.save(float_model.state_dict(), tmp_path / "fp32.pth")

    reference = _torchvision_int8(name, float_model.state_dict(), batches)
    model = builder(weights=str(tmp_path / "fp32.pth"), quantize=True, backend="x86", relu6="relu")
    calibrate(model, batches, progress=False)
    model = convert(model)

    x = torch.randn(4, 3, 64, 64, generator=generator)
    ours, theirs = model(x), reference(x)
    step = model.classifier[-1].scale
    assert step == pytest.approx(reference.classifier[-1].scale)
    assert (ours - theirs).abs().max().item() <= step * 1.001
    assert (ours - float_model.eval()(x)).abs().max().item() > 0  # really INT8, not the float model


def test_relu6_kept_unless_quantizing():
    """ReLU6 becomes a fusable ReLU only when quantizing; the float model keeps torchvision's ReLU6."""
    float_model = mobilenet_v2()
    assert any(type(m) is nn.ReLU6 for m in float_model.modules())
    prepared = mobilenet_v2(quantize=True, backend="x86")
    assert not any(type(m) is nn.ReLU6 for m in prepared.modules())
    assert type(prepared.features[0][0]).__name__ == "ConvReLU2d"


@pytest.mark.parametrize("builder", [mobilenet_v2, mobilenet_v3_small], ids=lambda b: b.__name__)
def test_fuse_level_blocks(builder):
    """``fuse_level='blocks'`` leaves the stem unfused (ReLU6/Hardswish as own INT8 ops) and still converts."""
    model = builder(quantize=True, backend="qnnpack", fuse_level="blocks")
    assert type(model.features[0][0]) is nn.Conv2d
    assert isinstance(model.features[0][1], nn.BatchNorm2d)
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False)
    int8 = convert(model)
    set_backend("qnnpack")
    with torch.no_grad():
        out = int8(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_se_block_fuses_fc1_relu():
    model = mobilenet_v3_small(quantize=True, is_qat=True, backend="x86")
    se = model.features[1].block[1]
    assert type(se.fc1).__name__ == "ConvReLU2d" and isinstance(se.activation, nn.Identity)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_fully_supported(name, tmp_path):
    result = assert_fully_supported(name, tmp_path)
    assert result.float_islands == 0
