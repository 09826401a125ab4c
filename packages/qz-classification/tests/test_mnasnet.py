"""MNASNet: the family contract, fusion levels, and torchvision's version-1 checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from qz_classification.models import mnasnet0_5
from qz_classification.models.mnasnet import QuantizableInvertedResidual, QuantizableMNASNet
from qz_core import calibrate, convert, set_backend

from conftest import assert_fully_supported, assert_matches_torchvision

ALL = ["mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"]


def test_matches_torchvision(tmp_path):
    assert_matches_torchvision("mnasnet0_5", tmp_path)


def test_fully_supported(tmp_path):
    result = assert_fully_supported("mnasnet0_5", tmp_path)
    assert result.float_islands == 0


def test_blocks_are_quantizable():
    model = mnasnet0_5()
    blocks = [m for m in model.modules() if isinstance(m, QuantizableInvertedResidual)]
    assert len(blocks) == 16
    assert not any(type(m) is torchvision.models.mnasnet._InvertedResidual for m in model.modules())
    assert all(hasattr(b, "skip_add") == b.apply_residual for b in blocks)


def _version1_checkpoint() -> tuple[nn.Module, dict]:
    """A torchvision mnasnet0_5 in the version-1 layout (32-16 channel stem), and its state dict."""
    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5()
    with pytest.warns(UserWarning, match="new version of MNASNet"):
        model._load_from_state_dict({}, "", {"version": 1}, False, [], [], [])
    return model.eval(), model.state_dict()


@torch.no_grad()
def test_version1_checkpoint_through_match_checkpoint():
    reference, state = _version1_checkpoint()
    model = QuantizableMNASNet(0.5)
    with pytest.warns(UserWarning, match="new version of MNASNet"):
        assert model.match_checkpoint(state)
    assert model.layers[0].out_channels == 32
    model.load_state_dict(state)
    assert not any(type(m) is torchvision.models.mnasnet._InvertedResidual for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model.eval()(x), reference(x))


@torch.no_grad()
def test_version1_checkpoint_through_load_state_dict():
    reference, state = _version1_checkpoint()
    model = QuantizableMNASNet(0.5)
    with pytest.warns(UserWarning, match="new version of MNASNet"):
        model.load_state_dict(state)
    assert isinstance(model.layers[8][0], QuantizableInvertedResidual)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model.eval()(x), reference(x))


def test_fuse_level_blocks():
    model = mnasnet0_5(quantize=True, backend="qnnpack", fuse_level="blocks")
    assert type(model.layers[0]) is nn.Conv2d
    assert type(model.layers[8][0].layers[0]).__name__ == "ConvReLU2d"
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False)
    int8 = convert(model)
    set_backend("qnnpack")
    with torch.no_grad():
        out = int8(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_fully_supported(name, tmp_path):
    result = assert_fully_supported(name, tmp_path)
    assert result.float_islands == 0
