"""EfficientNet B0-B7 and V2: float equivalence with torchvision, INT8 support, zero float islands."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qz_classification.models import efficientnet as eff
from qz_core import QzError, convert, count_float_islands

from conftest import assert_fully_supported, assert_matches_torchvision

VARIANTS = [f"efficientnet_b{i}" for i in range(8)] + [f"efficientnet_v2_{s}" for s in "sml"]

# Every layer has an INT8 kernel (SiLU runs as INT8 sigmoid times x), so nothing stays in float.
FLOAT_ISLANDS = 0


def test_efficientnet_b0_matches_torchvision(tmp_path):
    assert_matches_torchvision("efficientnet_b0", tmp_path)


def test_efficientnet_v2_s_matches_torchvision(tmp_path):
    assert_matches_torchvision("efficientnet_v2_s", tmp_path)


def test_efficientnet_b0_fully_supported(tmp_path):
    result = assert_fully_supported("efficientnet_b0", tmp_path)
    assert result.float_islands == FLOAT_ISLANDS


def test_quantizable_silu_is_exact_in_float_and_decomposes_when_prepared():
    silu = eff.QuantizableSiLU()
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(silu(x), nn.functional.silu(x))
    model = eff.efficientnet_b0(quantize=True, backend="qnnpack")
    silus = [m for m in model.modules() if isinstance(m, eff.QuantizableSiLU)]
    assert silu.is_float() and silus and not any(m.is_float() for m in silus)
    assert not any(type(m) is nn.SiLU for m in model.modules())


def test_qat_trains_with_stochastic_depth_and_converts():
    torch.manual_seed(0)
    model = eff.efficientnet_b0(quantize=True, is_qat=True, backend="qnnpack", stochastic_depth_prob=0.8)
    model.train()
    assert any(m.p > 0 for m in model.modules() if type(m).__name__ == "StochasticDepth")
    out = model(torch.randn(4, 3, 32, 32))
    out.mean().backward()
    int8 = convert(model)
    assert count_float_islands(int8) == FLOAT_ISLANDS
    with torch.no_grad():
        assert torch.isfinite(int8(torch.randn(1, 3, 32, 32))).all()


def test_fixed_norm_layer_is_rejected():
    with pytest.raises(QzError, match="efficientnet_b5 fixes norm_layer"):
        eff.efficientnet_b5(norm_layer=nn.BatchNorm2d)


@pytest.mark.zoo
@pytest.mark.parametrize("name", VARIANTS)
def test_zoo_efficientnet(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)
    result = assert_fully_supported(name, tmp_path)
    assert result.float_islands == FLOAT_ISLANDS
