"""Quantizable SSD300-VGG16: INT8 VGG features, extra layers and heads; float L2Norm, default boxes, NMS."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.detection import ssd as tv
from torchvision.models.detection.backbone_utils import _validate_trainable_layers
from torchvision.models.detection.ssd import (
    SSD,
    SSDClassificationHead,
    SSDFeatureExtractorVGG,
    SSDRegressionHead,
    SSDScoringHead,
)

from qz_classification.models.vgg import vgg16
from qz_core import define_model
from qz_core.builder import WeightsArg
from qz_detection.models._common import (
    QuantizableDetectorMixin,
    detector_spec,
    flatten_levels,
    quant_aware_anchors,
    upgrade,
)

__all__ = ["QuantizableSSD", "QuantizableSSDFeatureExtractorVGG", "ssd300_vgg16", "upgrade_scoring_head"]


class _QuantizableScoring:
    """SSD scoring head: one INT8 conv per level, levels concatenated through ``FloatFunctional``, dequantized.

    The levels have their own convs and scales; the INT8 concat requantizes them to one scale.
    """

    def _init_quant(self) -> None:
        self.cat = FloatFunctional()
        self.dequant = DeQuantStub()

    def forward(self, x: list[Tensor]) -> Tensor:
        levels = [self._get_result_from_module_list(f, i) for i, f in enumerate(x)]
        return self.dequant(self.cat.cat(flatten_levels(levels, self.num_columns), dim=1))


class QuantizableSSDClassificationHead(_QuantizableScoring, SSDClassificationHead):
    """SSD's classification head, INT8."""


class QuantizableSSDRegressionHead(_QuantizableScoring, SSDRegressionHead):
    """SSD's box-regression head, INT8."""


def upgrade_scoring_head(head: SSDScoringHead, classification: type, regression: type) -> None:
    """Upgrades the classification and regression heads of an SSD or SSDLite head in place."""
    upgrade(head.classification_head, classification)
    upgrade(head.regression_head, regression)


class QuantizableSSDFeatureExtractorVGG(SSDFeatureExtractorVGG):
    """VGG16 features and SSD's extra layers in INT8; the conv4_3 L2Norm runs in float between stubs.

    L2Norm divides each location by its channel norm (sum of squares, square root, division): torch.ao
    has no INT8 kernel for those, so ``scale_weight * normalize(x)`` is the one float island of SSD300.
    """

    qz_float_islands = 1  # counted by qz_core.count_float_islands

    def _init_quant(self) -> None:
        self.quant = QuantStub()
        self.l2norm_dequant = DeQuantStub()
        self.l2norm_quant = QuantStub()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.features(self.quant(x))
        rescaled = self.scale_weight.view(1, -1, 1, 1) * F.normalize(self.l2norm_dequant(x))
        output = [self.l2norm_quant(rescaled)]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(output)])


class QuantizableSSD(QuantizableDetectorMixin, SSD):
    """torchvision's SSD whose backbone and heads run INT8 once converted (float unconverted)."""

    backbone_scopes = ("backbone",)
    neck_and_head_scopes = ("head",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        quant_aware_anchors(self.anchor_generator)


def _ssd300_vgg16(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_backbone_layers: int | None,
    progress: bool,
    num_classes: int = 91,
    **kwargs: Any,
) -> QuantizableSSD:
    is_trained = weights is not None or weights_backbone is not None
    layers = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 4)
    backbone = tv._vgg_extractor(vgg16(weights=weights_backbone, progress=progress, skip_fuse=True), False, layers)
    upgrade(backbone, QuantizableSSDFeatureExtractorVGG)
    anchor_generator = tv.DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    defaults = {"image_mean": [0.48235, 0.45882, 0.40784], "image_std": [1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0]}
    model = QuantizableSSD(backbone, anchor_generator, (300, 300), num_classes, **{**defaults, **kwargs})
    upgrade_scoring_head(model.head, QuantizableSSDClassificationHead, QuantizableSSDRegressionHead)
    return model


_BASE = detector_spec(
    "ssd300_vgg16",
    "ssd",
    _ssd300_vgg16,
    tv.SSD300_VGG16_Weights,
    input_size=(300, 300),
    description="SSD300 VGG16 (torchvision's architecture and weights)",
)
ssd300_vgg16 = define_model(_BASE)
