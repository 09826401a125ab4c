"""Quantizable ConvNeXt: torchvision's float output, INT8 everywhere (LayerNorm and GELU too), INT8 ONNX."""

from __future__ import annotations

import copy

import pytest
import torch

from qz_classification.models import convnext
from qz_core import QzError, count_float_islands

from conftest import assert_fully_supported, assert_matches_torchvision

VARIANTS = ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]
# Random-init layer_scale is 1e-6, so each block adds ~1e-6 of the residual stream: QNNPACK's
# quantized add refuses input/output scale ratios below 2**-14. Trained ConvNeXts have scales
# around 0.01-1; the probe uses 0.1.
TRAINED_LIKE = {"layer_scale": 0.1}


def test_matches_torchvision(tmp_path):
    assert_matches_torchvision("convnext_tiny", tmp_path)
    assert_matches_torchvision("convnext_tiny", tmp_path, **TRAINED_LIKE)


def test_fully_supported_without_float_islands(tmp_path):
    result = assert_fully_supported("convnext_tiny", tmp_path, **TRAINED_LIKE)
    assert result.float_islands == 0


def test_layer_scale_fold_keeps_the_float_output():
    torch.manual_seed(0)
    model = convnext.convnext_tiny(layer_scale=0.3).eval()
    for block in model.modules():
        if isinstance(block, convnext.QuantizableCNBlock):
            block.layer_scale.data.uniform_(0.01, 0.5)
    folded = copy.deepcopy(model)
    folded.fuse_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(b.layer_scale is None for b in folded.modules() if isinstance(b, convnext.QuantizableCNBlock))
    assert not any(k.endswith("layer_scale") for k in folded.state_dict())


def test_int8_modules():
    model = convnext.convnext_tiny(quantize=True, backend="x86")
    model(torch.randn(1, 3, 32, 32))
    int8 = torch.ao.quantization.convert(model)
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in int8.modules()}
    assert "torch.ao.nn.quantized.modules.normalization.LayerNorm" in kinds
    assert "torch.nn.modules.normalization.LayerNorm" not in kinds
    assert "torch.nn.modules.linear.Linear" not in kinds
    assert count_float_islands(int8) == 0


def test_rejects_foreign_block_or_norm():
    with pytest.raises(QzError, match="block or norm_layer"):
        convnext.convnext_tiny(norm_layer=torch.nn.LayerNorm)


@pytest.mark.zoo
@pytest.mark.parametrize("name", VARIANTS)
def test_zoo_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", VARIANTS)
def test_zoo_fully_supported(name, tmp_path):
    assert assert_fully_supported(name, tmp_path, **TRAINED_LIKE).float_islands == 0
