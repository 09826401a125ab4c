import pytest
import torch
import torchvision
from torchvision.models import quantization as tvq

import qz_core
from qz_core import QzError, estimate_bn_stats

from conftest import assert_fully_supported, assert_matches_torchvision

RESNETS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip
FAST = ["resnet18", "resnet50", "resnext50_32x4d"]


def test_every_resnet_is_registered():
    assert set(qz_core.list_models("*res*", task="classification")) >= set(RESNETS)


@pytest.mark.parametrize("name", FAST)
def test_unconverted_equals_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", RESNETS)
def test_zoo_unconverted_equals_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.parametrize("name", ["resnet18"])
def test_fully_supported(name, tmp_path):
    assert assert_fully_supported(name, tmp_path).float_islands == 0


@pytest.mark.zoo
@pytest.mark.parametrize("name", RESNETS)
def test_zoo_fully_supported(name, tmp_path):
    assert assert_fully_supported(name, tmp_path).float_islands == 0


def _calibrated_float(name, seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name)
    batches = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    estimate_bn_stats(model, batches)
    return model.eval(), batches


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_int8_matches_torchvision_quantization(name, tmp_path):
    """Same float weights, calibration batches and backend: the same INT8 model as torchvision's."""
    float_model, batches = _calibrated_float(name)
    path = tmp_path / f"{name}.pth"
    torch.save(float_model.state_dict(), path)
    qz_core.set_backend("x86")

    reference = getattr(tvq, name)(weights=None, quantize=False)
    reference.load_state_dict(float_model.state_dict())
    reference.eval().fuse_model()
    reference.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    torch.ao.quantization.prepare(reference, inplace=True)
    with torch.no_grad():
        for batch in batches:
            reference(batch)
    torch.ao.quantization.convert(reference, inplace=True)

    model = qz_core.get_model(name, weights=str(path), quantize=True, backend="x86")
    qz_core.calibrate(model, batches, progress=False)
    int8 = qz_core.convert(model)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(int8(x), reference(x))


def test_save_load_and_onnx_round_trip(tmp_path):
    float_model, batches = _calibrated_float("resnet18")
    torch.save(float_model.state_dict(), tmp_path / "r18.pth")
    model = qz_core.get_model("resnet18", weights=str(tmp_path / "r18.pth"), quantize=True)
    qz_core.calibrate(model, batches, progress=False)
    int8 = qz_core.convert(model)
    qz_core.save_quantized(int8, tmp_path / "r18_int8.pt")
    x = torch.randn(1, 3, 64, 64)
    loaded = qz_core.load_quantized(tmp_path / "r18_int8.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))
    report = qz_core.export_onnx(loaded, tmp_path / "r18_int8.onnx", x)
    assert report.max_abs_diff <= 0.1 * report.output_range


def test_fuse_levels_and_quantize_from(tmp_path):
    blocks = qz_core.get_model("resnet18", quantize=True, fuse_level="blocks")
    assert type(blocks.conv1) is torch.nn.Conv2d and not isinstance(blocks.bn1, torch.nn.Identity)
    assert isinstance(blocks.layer1[0].bn1, torch.nn.Identity)
    fused = qz_core.get_model("resnet18", quantize=True)
    assert isinstance(fused.bn1, torch.nn.Identity)

    float_model, batches = _calibrated_float("resnet18")
    torch.save(float_model.state_dict(), tmp_path / "r18.pth")
    model = qz_core.get_model("resnet18", weights=str(tmp_path / "r18.pth"), quantize=True, quantize_from="layer2")
    qz_core.calibrate(model, batches, progress=False)
    int8 = qz_core.convert(model)
    assert type(int8.layer1[0].conv1).__module__.startswith("torch.ao.nn.intrinsic")  # fused, still float
    assert type(int8.layer2.module[0].conv1).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    assert int8(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_wrong_checkpoint_is_named(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(QzError, match=r"do not match QuantizableResNet: missing keys: layer1\.2\.conv1\.weight"):
        qz_core.get_model("resnet34", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(QzError, match=r"resnext50_32x4d has groups=32; got groups=8"):
        qz_core.get_model("resnext50_32x4d", groups=8)
    with pytest.raises(QzError, match=r"Invalid weights 'IMAGENET1K_V3'.*IMAGENET1K_V1, IMAGENET1K_V2"):
        qz_core.get_model("resnet50", weights="IMAGENET1K_V3")


def test_num_classes_is_checked_against_the_weights_before_downloading(monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("downloaded before checking num_classes against the weights' categories")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", download)
    with pytest.raises(QzError, match=r"num_classes=10 does not match weights ResNet50_Weights.IMAGENET1K_V2"):
        qz_core.get_model("resnet50", weights="DEFAULT", num_classes=10)
