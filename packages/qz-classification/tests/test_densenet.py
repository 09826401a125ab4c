"""Quantizable DenseNet: torchvision parity, full INT8 support (ONNX included), fusion and loading."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from qz_classification.models.densenet import remap_legacy_keys
from qz_core import QzError, count_float_islands, get_model

from conftest import assert_fully_supported, assert_matches_torchvision

VARIANTS = ["densenet121", "densenet161", "densenet169", "densenet201"]


def unfused(model: nn.Module) -> list[str]:
    """BatchNorm and ReLU modules left outside torch's fused (intrinsic) modules."""
    inside = set()
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.intrinsic"):
            inside |= {f"{name}.{child}" for child, _ in module.named_modules() if child}
    return [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, nn.ReLU) and n not in inside]


def test_densenet121_matches_torchvision(tmp_path):
    assert_matches_torchvision("densenet121", tmp_path)


def test_densenet121_fully_supported(tmp_path):
    result = assert_fully_supported("densenet121", tmp_path, input_size=64)
    assert result.float_islands == 0


@pytest.mark.parametrize("is_qat", [False, True])
@pytest.mark.parametrize("bn_relu", ["conv", "bn"])
def test_every_batchnorm_and_relu_fuses(is_qat, bn_relu):
    model = get_model("densenet121", quantize=True, is_qat=is_qat, bn_relu=bn_relu)
    assert unfused(model) == []
    assert count_float_islands(model) == 0
    # 'conv' turns the BN-ReLU pairs into conv-ReLU: no BNReLU2d, which has no ONNX export.
    bn_relus = [m for m in model.modules() if type(m).__name__ == "BNReLU2d"]
    assert (len(bn_relus) == 0) == (bn_relu == "conv")


def test_bn_relu_form_is_checked():
    with pytest.raises(QzError, match="'batchnorm'.*conv"):
        get_model("densenet121", bn_relu="batchnorm")


def test_legacy_torchvision_keys_load(tmp_path):
    """torchvision's DenseNet checkpoints name keys 'norm.1', 'conv.2': qz renames them as torchvision does."""
    torch.manual_seed(0)
    reference = torchvision.models.densenet121().eval()
    # As in torchvision's files: 'denselayer1.norm.1.weight', and no num_batches_tracked (older than it).
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
        for key, value in reference.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in legacy)
    assert remap_legacy_keys(legacy).keys() == reference.state_dict().keys()
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    model = get_model("densenet121", weights=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.zoo
@pytest.mark.parametrize("name", VARIANTS)
def test_zoo_densenet(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)
    result = assert_fully_supported(name, tmp_path, input_size=64)
    assert result.float_islands == 0


@pytest.mark.parametrize("fuse", [False, True])
def test_quantized_batchnorm_exports_to_onnx(fuse, tmp_path):
    """quantized::batch_norm2d(_relu) export through the symbolics densenet.py registers."""
    import torch.ao.quantization as tq

    from qz_core import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.BatchNorm2d(8), nn.ReLU(), tq.DeQuantStub())
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    if fuse:
        tq.fuse_modules(model, [["1", "2"]], inplace=True)
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    x = torch.randn(2, 8, 5, 5)
    model(x)
    tq.convert(model, inplace=True)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("BNReLU2d" in kinds) == fuse and ("BatchNorm2d" in kinds) != fuse
    report = export_onnx(model, tmp_path / "bn.onnx", x)
    assert report.quantized and report.max_abs_diff <= 2 * model[0].scale.item() + 1e-6
