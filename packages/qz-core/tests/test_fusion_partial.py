import pytest
import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.nn.quantized import Linear as QLinear

import qz_core
from qz_core import QzError, count_float_islands, fuse_sequentials, sequential_fusion_groups

from conftest import TINY, random_batches


def _seq():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
        nn.ReLU6(), nn.Flatten(), nn.Linear(4, 4), nn.ReLU(),
    )  # fmt: skip


def test_sequential_groups_find_longest_exact_patterns():
    assert sequential_fusion_groups(_seq()) == [["0", "1", "2"], ["3", "4"], ["7", "8"]]


def test_fuse_sequentials_ptq_folds_bn_and_keeps_output():
    torch.manual_seed(0)
    model = _seq().eval()
    x = torch.randn(2, 3, 3, 3)
    expected = model(x)
    assert fuse_sequentials(model, is_qat=False) == 3
    assert isinstance(model[0], nni.ConvReLU2d) and isinstance(model[7], nni.LinearReLU)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_fuse_sequentials_qat_keeps_bn_trainable():
    model = _seq().train()
    fuse_sequentials(model, is_qat=True)
    assert isinstance(model[0], nni.ConvBnReLU2d) and isinstance(model[0][1], nn.BatchNorm2d)


def test_fuse_level_is_checked():
    with pytest.raises(QzError, match=r"Invalid fuse level 'everything'.*Valid fuse levels: all, blocks, none"):
        qz_core.get_model(TINY, quantize=True, fuse_level="everything")


@pytest.mark.parametrize(("level", "fused_stem"), [("none", False), ("blocks", False), ("all", True)])
def test_fuse_levels(level, fused_stem):
    model = qz_core.get_model(TINY, quantize=True, fuse_level=level)
    assert ("ConvReLU2d" in type(model.stem[0]).__name__) is fused_stem
    assert isinstance(model.block.bn, nn.Identity) is (level != "none")


def test_float_modules_stay_float_behind_stubs(checkpoint):
    path, _ = checkpoint
    model = qz_core.get_model(TINY, weights=str(path), quantize=True, float_modules=["fc"])
    qz_core.calibrate(model, random_batches(), progress=False)
    int8 = qz_core.convert(model)
    assert count_float_islands(int8) == 1
    assert type(int8.fc.module) is nn.Linear  # float
    assert isinstance(int8.block.conv, torch.ao.nn.quantized.Conv2d)
    assert int8(torch.randn(1, 3, 32, 32)).dtype == torch.float32


def test_quantize_from_keeps_earlier_stages_float(checkpoint):
    path, float_model = checkpoint
    model = qz_core.get_model(TINY, weights=str(path), quantize=True, quantize_from="fc")
    qz_core.calibrate(model, random_batches(), progress=False)
    int8 = qz_core.convert(model)
    assert not isinstance(int8.stem[0], torch.ao.nn.quantized.Conv2d)
    assert isinstance(int8.fc.module, QLinear)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        error = (int8(x) - float_model(x)).abs().max()
    assert error < 0.1  # only the classifier is quantized


def test_unknown_partial_module_is_named():
    with pytest.raises(QzError, match=r"Invalid float_modules module 'fc2'.*Did you mean 'fc'"):
        qz_core.get_model(TINY, quantize=True, float_modules=["fc2"])


def test_qat_fusion_and_prepare():
    model = qz_core.get_model(TINY, quantize=True, is_qat=True)
    assert model.training
    assert isinstance(model.block.conv, nniqat.ConvBn2d)
    assert isinstance(model.stem[0], nniqat.ConvBnReLU2d)


def test_modules_declare_their_own_float_parts():
    class FloatInside(nn.Module):  # like SSD300's L2Norm between its own stubs
        qz_float_islands = 1

    model = nn.Sequential(nn.Conv2d(1, 1, 1), FloatInside(), nn.Sequential(FloatInside()))
    assert count_float_islands(model) == 2
    assert count_float_islands(nn.Sequential(nn.Conv2d(1, 1, 1))) == 0
