"""Quantizable DeepLabV3 with a dilated ResNet-50/101 or MobileNetV3-Large backbone."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

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

from qz_core import ModelSpec, define_model
from qz_core.builder import WeightsArg
from qz_segmentation.models._base import (
    DEPLOYED_RATIO_TARGET,
    INPUT_SIZE,
    TASK,
    TRANSIENT_KWARGS,
    QuantizableSegmentationModel,
    check_num_classes,
    mobilenet_v3_features,
    mobilenet_v3_getter,
    resnet_backbone,
    with_aux_head,
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


_DEEPLABV3 = ModelSpec(
    name="deeplabv3_resnet50",
    task=TASK,
    family="deeplabv3",
    make_model=partial(_deeplabv3_resnet, "resnet50"),
    weights_enum=DeepLabV3_ResNet50_Weights,
    input_size=INPUT_SIZE,
    adjust_kwargs=with_aux_head,
    transient_kwargs=TRANSIENT_KWARGS,
    deployed_ratio_target=DEPLOYED_RATIO_TARGET,
    description="DeepLabV3, dilated ResNet-50 backbone",
)

deeplabv3_resnet50 = define_model(_DEEPLABV3)
deeplabv3_resnet101 = define_model(
    _DEEPLABV3.variant(
        name="deeplabv3_resnet101",
        make_model=partial(_deeplabv3_resnet, "resnet101"),
        weights_enum=DeepLabV3_ResNet101_Weights,
        description="DeepLabV3, dilated ResNet-101 backbone",
    )
)
deeplabv3_mobilenet_v3_large = define_model(
    _DEEPLABV3.variant(
        name="deeplabv3_mobilenet_v3_large",
        make_model=_deeplabv3_mobilenetv3,
        weights_enum=DeepLabV3_MobileNet_V3_Large_Weights,
        description="DeepLabV3, dilated MobileNetV3-Large backbone",
    )
)
