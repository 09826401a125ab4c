"""Quantizable RetinaNet (ResNet50-FPN, v1 and v2): INT8 backbone, FPN and heads; float anchors, decoding, NMS."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub
from torchvision.models.detection import retinanet as tv
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from qz_core import define_model, resolve_weights
from qz_core.builder import WeightsArg
from qz_detection.models._backbones import resnet50_fpn
from qz_detection.models._common import (
    QuantizableDetectorMixin,
    detector_spec,
    flatten_levels,
    quant_aware_anchors,
    upgrade,
)

__all__ = [
    "QuantizableRetinaNet",
    "QuantizableRetinaNetClassificationHead",
    "QuantizableRetinaNetRegressionHead",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
]


class QuantizableRetinaNetClassificationHead(RetinaNetClassificationHead):
    """Shared conv tower and logits conv in INT8; the level concat through ``FloatFunctional``, then dequantized.

    One conv serves every level, so all levels share its output scale and the concat copies bytes.
    GroupNorm (v2) runs as torch.ao's quantized GroupNorm, on x86 and qnnpack alike.
    """

    def _init_quant(self) -> None:
        self.cat = FloatFunctional()
        self.dequant = DeQuantStub()

    def forward(self, x: list[Tensor]) -> Tensor:
        levels = [self.cls_logits(self.conv(f)) for f in x]
        return self.dequant(self.cat.cat(flatten_levels(levels, self.num_classes), dim=1))


class QuantizableRetinaNetRegressionHead(RetinaNetRegressionHead):
    """Box-regression tower and conv in INT8, levels concatenated through ``FloatFunctional``, then dequantized."""

    def _init_quant(self) -> None:
        self.cat = FloatFunctional()
        self.dequant = DeQuantStub()

    def forward(self, x: list[Tensor]) -> Tensor:
        levels = [self.bbox_reg(self.conv(f)) for f in x]
        return self.dequant(self.cat.cat(flatten_levels(levels, 4), dim=1))


class QuantizableRetinaNet(QuantizableDetectorMixin, RetinaNet):
    """torchvision's RetinaNet whose backbone, FPN and heads run INT8 once converted.

    Unconverted it is torchvision's float model: stubs are identities, ``FloatFunctional`` adds and
    concatenates as ``+`` and ``torch.cat`` do.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        upgrade(self.head.classification_head, QuantizableRetinaNetClassificationHead)
        upgrade(self.head.regression_head, QuantizableRetinaNetRegressionHead)
        quant_aware_anchors(self.anchor_generator)


def _retinanet_v1(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_backbone_layers: int | None,
    progress: bool,
    num_classes: int = 91,
    **kwargs: Any,
) -> QuantizableRetinaNet:
    backbone = resnet50_fpn(
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_layers=trainable_backbone_layers,
        progress=progress,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = QuantizableRetinaNet(backbone, num_classes, **kwargs)
    source = resolve_weights(weights, tv.RetinaNet_ResNet50_FPN_Weights)
    if source is not None and source.enum_member is tv.RetinaNet_ResNet50_FPN_Weights.COCO_V1:
        overwrite_eps(model, 0.0)  # as torchvision does for these weights (eps is not in the state dict)
    return model


def _retinanet_v2(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_backbone_layers: int | None,
    progress: bool,
    num_classes: int = 91,
    **kwargs: Any,
) -> QuantizableRetinaNet:
    # torchvision's v2 keeps a plain BatchNorm2d backbone even with weights.
    backbone = resnet50_fpn(
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_layers=trainable_backbone_layers,
        progress=progress,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(2048, 256),
        norm_layer=nn.BatchNorm2d,
    )
    anchor_generator = tv._default_anchorgen()
    head = RetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=partial(nn.GroupNorm, 32),
    )
    head.regression_head._loss_type = "giou"
    return QuantizableRetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)


_BASE = detector_spec(
    "retinanet_resnet50_fpn",
    "retinanet",
    _retinanet_v1,
    tv.RetinaNet_ResNet50_FPN_Weights,
    input_size=(800, 800),
    description="RetinaNet ResNet50-FPN (torchvision's architecture and weights)",
)
retinanet_resnet50_fpn = define_model(_BASE)
retinanet_resnet50_fpn_v2 = define_model(
    _BASE.variant(
        name="retinanet_resnet50_fpn_v2",
        make_model=_retinanet_v2,
        weights_enum=tv.RetinaNet_ResNet50_FPN_V2_Weights,
        description="RetinaNet ResNet50-FPN v2 (torchvision's architecture and weights)",
    )
)
