"""Quantizable FCOS (ResNet50-FPN): INT8 backbone, FPN and GroupNorm heads; float points, decoding, NMS."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub
from torchvision.models.detection import fcos as tv
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSRegressionHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from qz_core import define_model
from qz_core.builder import WeightsArg
from qz_detection.models._backbones import resnet50_fpn
from qz_detection.models._common import (
    QuantizableDetectorMixin,
    detector_spec,
    flatten_levels,
    quant_aware_anchors,
    upgrade,
)

__all__ = ["QuantizableFCOS", "QuantizableFCOSClassificationHead", "QuantizableFCOSRegressionHead", "fcos_resnet50_fpn"]


class QuantizableFCOSClassificationHead(FCOSClassificationHead):
    """Conv-GroupNorm-ReLU tower and logits conv in INT8 (torch.ao's quantized GroupNorm), levels concatenated INT8."""

    def _init_quant(self) -> None:
        self.cat = FloatFunctional()
        self.dequant = DeQuantStub()

    def forward(self, x: list[Tensor]) -> Tensor:
        levels = [self.cls_logits(self.conv(f)) for f in x]
        return self.dequant(self.cat.cat(flatten_levels(levels, self.num_classes), dim=1))


class QuantizableFCOSRegressionHead(FCOSRegressionHead):
    """Box distances (conv + ReLU) and centerness in INT8, levels concatenated INT8, then dequantized."""

    def _init_quant(self) -> None:
        self.cat_regression = FloatFunctional()
        self.cat_ctrness = FloatFunctional()
        self.dequant = DeQuantStub()

    def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        features = [self.conv(f) for f in x]
        regression = [nn.functional.relu(self.bbox_reg(f)) for f in features]
        ctrness = [self.bbox_ctrness(f) for f in features]
        return (
            self.dequant(self.cat_regression.cat(flatten_levels(regression, 4), dim=1)),
            self.dequant(self.cat_ctrness.cat(flatten_levels(ctrness, 1), dim=1)),
        )


class QuantizableFCOS(QuantizableDetectorMixin, FCOS):
    """torchvision's FCOS whose backbone, FPN and heads run INT8 once converted (float unconverted)."""

    def __init__(self, backbone: nn.Module, num_classes: int, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        upgrade(self.head.classification_head, QuantizableFCOSClassificationHead)
        upgrade(self.head.regression_head, QuantizableFCOSRegressionHead)
        quant_aware_anchors(self.anchor_generator)


def _fcos(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_backbone_layers: int | None,
    progress: bool,
    num_classes: int = 91,
    **kwargs: Any,
) -> QuantizableFCOS:
    backbone = resnet50_fpn(
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_layers=trainable_backbone_layers,
        progress=progress,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return QuantizableFCOS(backbone, num_classes, **kwargs)


_BASE = detector_spec(
    "fcos_resnet50_fpn",
    "fcos",
    _fcos,
    tv.FCOS_ResNet50_FPN_Weights,
    input_size=(800, 800),
    description="FCOS ResNet50-FPN (torchvision's architecture and weights)",
)
fcos_resnet50_fpn = define_model(_BASE)
