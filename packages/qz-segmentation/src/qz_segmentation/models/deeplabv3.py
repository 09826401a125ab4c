"""Quantizable DeepLabV3 with a dilated ResNet-50/101 or MobileNetV3-Large backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.ao.nn.quantized import FloatFunctional
from torchvision.models.segmentation.deeplabv3 import (
    ASPP,
    DeepLabHead,
    DeepLabV3,
    DeepLabV3_MobileNet_V3_Large_Weights,
    DeepLabV3_ResNet50_Weights,
    DeepLabV3_ResNet101_Weights,
)
from torchvision.models.segmentation.fcn import FCNHead

from qz_core.builder import WeightsArg
from qz_segmentation._registry import check_num_classes, define_segmenter
from qz_segmentation.models._base import (
    QuantizableSegmentationModel,
    mobilenet_v3_features,
    mobilenet_v3_getter,
    resnet_backbone,
)

__all__ = [
    "QuantizableASPP",
    "QuantizableDeepLabHead",
    "QuantizableDeepLabV3",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
]


class QuantizableASPP(ASPP):
    """ASPP whose concatenation of the five branches runs through ``FloatFunctional``.

    The branches (1x1, three atrous 3x3, and the image pooling branch with its upsampling of a
    1x1 map) are torchvision's nn.Sequentials: their conv-bn-ReLU runs fuse, and all run in INT8.
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__(in_channels, atrous_rates, out_channels)
        self.cat = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.cat.cat([conv(x) for conv in self.convs], dim=1))


class QuantizableDeepLabHead(DeepLabHead):
    """DeepLabHead with a QuantizableASPP (the rest is conv-bn-ReLU and the classifier conv)."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(in_channels, num_classes, atrous_rates)
        self[0] = QuantizableASPP(in_channels, atrous_rates)


class QuantizableDeepLabV3(QuantizableSegmentationModel, DeepLabV3):
    """torchvision's DeepLabV3 between a QuantStub and a DeQuantStub."""


def _deeplabv3_resnet(
    arch: str, num_classes: int = 21, aux_loss: bool | None = None, weights_backbone: WeightsArg = None
) -> QuantizableDeepLabV3:
    return_layers = {"layer4": "out"} | ({"layer3": "aux"} if aux_loss else {})
    backbone = resnet_backbone(arch, weights_backbone, return_layers)
    classifier = QuantizableDeepLabHead(2048, check_num_classes(num_classes))
    return QuantizableDeepLabV3(backbone, classifier, FCNHead(1024, num_classes) if aux_loss else None)


def _deeplabv3_mobilenetv3(
    num_classes: int = 21, aux_loss: bool | None = None, weights_backbone: WeightsArg = None
) -> QuantizableDeepLabV3:
    features, stages = mobilenet_v3_features(weights_backbone)
    out_pos, aux_pos = stages[-1], stages[-4]  # C5 (output stride 16), C2 (output stride 8)
    return_layers = {str(out_pos): "out"} | ({str(aux_pos): "aux"} if aux_loss else {})
    classifier = QuantizableDeepLabHead(features[out_pos].out_channels, check_num_classes(num_classes))
    aux_classifier = FCNHead(features[aux_pos].out_channels, num_classes) if aux_loss else None
    return QuantizableDeepLabV3(mobilenet_v3_getter(features, return_layers), classifier, aux_classifier)


def _make_resnet(arch: str) -> Any:
    return lambda **kwargs: _deeplabv3_resnet(arch, **kwargs)


deeplabv3_resnet50 = define_segmenter(
    "deeplabv3_resnet50", DeepLabV3_ResNet50_Weights, "deeplabv3", _make_resnet("resnet50")
)
deeplabv3_resnet101 = define_segmenter(
    "deeplabv3_resnet101", DeepLabV3_ResNet101_Weights, "deeplabv3", _make_resnet("resnet101")
)
deeplabv3_mobilenet_v3_large = define_segmenter(
    "deeplabv3_mobilenet_v3_large", DeepLabV3_MobileNet_V3_Large_Weights, "deeplabv3", _deeplabv3_mobilenetv3
)
