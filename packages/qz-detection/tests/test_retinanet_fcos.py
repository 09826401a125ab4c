"""RetinaNet (v1, v2) and FCOS: torchvision float equality, fusion, INT8 on both engines, QAT, ONNX."""

from __future__ import annotations

import pytest
import torch

import qz_core
from qz_core import QzError, calibrate, convert
from qz_detection.models._common import QuantizableFeaturePyramidNetwork

from conftest import SMALL, assert_fully_supported, assert_matches_torchvision

ALL = ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]


def test_registered_with_detection_specs():
    for name in ALL:
        spec = qz_core.get_model_spec(name)
        assert spec.task == "detection"
        assert spec.deployed_ratio_target == 0.4
        assert spec.family in ("retinanet", "fcos")
        assert spec.input_size == (800, 800)
        assert "weights" in spec.transient_kwargs and "progress" in spec.transient_kwargs
        assert spec.weights_enum.DEFAULT.transforms().__class__.__name__ == "ObjectDetection"
        assert type(qz_core.get_model_transforms(name)).__name__ == "ObjectDetection"


@pytest.mark.parametrize("frozen", [False, True], ids=["batchnorm", "frozen_bn"])
def test_retinanet_matches_torchvision(tmp_path, frozen):
    assert_matches_torchvision("retinanet_resnet50_fpn", tmp_path, frozen=frozen)


def test_retinanet_v2_with_groupnorm_matches_torchvision(tmp_path):
    assert_matches_torchvision("retinanet_resnet50_fpn_v2", tmp_path)


def test_fcos_frozen_bn_matches_torchvision(tmp_path):
    assert_matches_torchvision("fcos_resnet50_fpn", tmp_path, frozen=True)


def test_wrong_checkpoint_is_a_qz_error(tmp_path):
    path = tmp_path / "fcos.pth"
    torch.save(qz_core.get_model("fcos_resnet50_fpn", **SMALL).state_dict(), path)
    with pytest.raises(QzError, match="do not match QuantizableRetinaNet"):
        qz_core.get_model("retinanet_resnet50_fpn", weights=str(path))
    with pytest.raises(QzError, match="COCO_V1"):
        qz_core.get_model("retinanet_resnet50_fpn", weights="COCO_V9")


def test_fuse_folds_frozen_batchnorm_and_quantizes_fpn_and_heads(tmp_path):
    torch.manual_seed(0)
    model = qz_core.get_model("retinanet_resnet50_fpn", quantize=True, backend="qnnpack", **SMALL)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d,)) for m in model.modules())
    assert isinstance(model.backbone.fpn, QuantizableFeaturePyramidNetwork)
    calibrate(model, [torch.rand(1, 3, 150, 170)], progress=False)
    int8 = convert(model)
    names = {type(m).__name__ for m in int8.modules()}
    assert {"ConvReLU2d", "Conv2d", "QFunctional", "Quantize", "DeQuantize"} <= names
    assert type(int8.head.classification_head.cls_logits).__module__.startswith("torch.ao.nn.quantized")
    assert type(int8.backbone.fpn.extra_blocks.p7).__module__.startswith("torch.ao.nn.quantized")
    detections = int8([torch.rand(3, 150, 170)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_retinanet_fully_supported(tmp_path):
    assert_fully_supported("retinanet_resnet50_fpn", tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_fully_supported(tmp_path, name):
    assert_fully_supported(name, tmp_path)
