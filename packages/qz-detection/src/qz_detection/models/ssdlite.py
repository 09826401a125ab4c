"""Quantizable SSDLite320-MobileNetV3-Large: INT8 backbone, extra blocks and depthwise heads; float boxes, NMS."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.quantization import QuantStub
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssdlite as tv
from torchvision.models.detection.backbone_utils import _validate_trainable_layers
from torchvision.models.detection.ssdlite import (
    SSDLiteClassificationHead,
    SSDLiteFeatureExtractorMobileNet,
    SSDLiteHead,
    SSDLiteRegressionHead,
)

from qz_classification.models.mobilenetv3 import mobilenet_v3_large
from qz_core import define_model
from qz_core.builder import WeightsArg
from qz_detection.models._common import detector_spec, upgrade
from qz_detection.models.ssd import QuantizableSSD, _QuantizableScoring, upgrade_scoring_head

__all__ = ["QuantizableSSDLiteFeatureExtractorMobileNet", "ssdlite320_mobilenet_v3_large"]


class QuantizableSSDLiteClassificationHead(_QuantizableScoring, SSDLiteClassificationHead):
    """SSDLite's depthwise classification head, INT8 (conv-bn-ReLU6 fused as conv-ReLU)."""


class QuantizableSSDLiteRegressionHead(_QuantizableScoring, SSDLiteRegressionHead):
    """SSDLite's depthwise box-regression head, INT8."""


class QuantizableSSDLiteFeatureExtractorMobileNet(SSDLiteFeatureExtractorMobileNet):
    """MobileNetV3 features (hardswish, SE) and SSDLite's extra blocks after a QuantStub, all INT8."""

    def _init_quant(self) -> None:
        self.quant = QuantStub()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return super().forward(self.quant(x))


def _ssdlite(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_backbone_layers: int | None,
    progress: bool,
    num_classes: int = 91,
    norm_layer: Any = None,
    **kwargs: Any,
) -> QuantizableSSD:
    layers = _validate_trainable_layers(
        weights is not None or weights_backbone is not None, trainable_backbone_layers, 6, 6
    )
    norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    backbone = mobilenet_v3_large(
        weights=weights_backbone,
        progress=progress,
        norm_layer=norm_layer,
        reduced_tail=weights_backbone is None,  # as torchvision (MobileNetV3 paper, table 6)
        skip_fuse=True,
    )
    if weights_backbone is None:
        tv._normal_init(backbone)
    backbone = upgrade(
        tv._mobilenet_extractor(backbone, layers, norm_layer), QuantizableSSDLiteFeatureExtractorMobileNet
    )
    size = (320, 320)
    anchor_generator = tv.DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = det_utils.retrieve_out_channels(backbone, size)
    head = SSDLiteHead(out_channels, anchor_generator.num_anchors_per_location(), num_classes, norm_layer)
    defaults = {
        "score_thresh": 0.001,
        "nms_thresh": 0.55,
        "detections_per_img": 300,
        "topk_candidates": 300,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    model = QuantizableSSD(backbone, anchor_generator, size, num_classes, head=head, **{**defaults, **kwargs})
    upgrade_scoring_head(model.head, QuantizableSSDLiteClassificationHead, QuantizableSSDLiteRegressionHead)
    return model


_BASE = detector_spec(
    "ssdlite320_mobilenet_v3_large",
    "ssdlite",
    _ssdlite,
    tv.SSDLite320_MobileNet_V3_Large_Weights,
    input_size=(320, 320),
    description="SSDLite320 MobileNetV3-Large (torchvision's architecture and weights)",
)
ssdlite320_mobilenet_v3_large = define_model(_BASE)
