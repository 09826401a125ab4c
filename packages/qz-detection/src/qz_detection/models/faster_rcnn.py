"""Quantizable Faster R-CNN (ResNet50-FPN v1/v2, MobileNetV3-Large FPN and 320 FPN).

INT8: backbone, FPN (adds, upsampling, the P6 subsampling), RPN head, RoI box head and predictor.
Float: transform, anchors, proposal decoding and NMS, RoIAlign, box decoding and postprocess.
MultiScaleRoIAlign runs on dequantized features: it samples bilinearly at float box coordinates
and scatters per-level results (each with its own scale) into one tensor; torchvision's quantized
roi_align kernel covers a single level only. Its output is quantized again for the box head.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.detection import faster_rcnn as tv
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from qz_core import define_model, resolve_weights
from qz_core.builder import WeightsArg
from qz_detection.models._backbones import mobilenet_v3_large_fpn, resnet50_fpn
from qz_detection.models._common import QuantizableDetectorMixin, detector_spec, quant_aware_anchors, upgrade

__all__ = [
    "QuantizableFasterRCNN",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "resnet50_fpn_v1_maker",
    "resnet50_fpn_v2_maker",
]


class QuantizableRPNHead(RPNHead):
    """RPN conv(s), objectness and box-delta convs in INT8; each level's outputs dequantized for decoding."""

    def _init_quant(self) -> None:
        self.dequant = DeQuantStub()

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.dequant(self.cls_logits(t)))
            deltas.append(self.dequant(self.bbox_pred(t)))
        return logits, deltas


class QuantizableMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign between stubs: float RoIAlign on dequantized features, INT8 pooled output."""

    qz_float_islands = 1  # counted by qz_core.count_float_islands

    def _init_quant(self) -> None:
        self.dequant = DeQuantStub()
        self.quant = QuantStub()

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = OrderedDict((k, self.dequant(v)) for k, v in x.items() if k in self.featmap_names)
        return self.quant(super().forward(features, boxes, image_shapes))


class QuantizableTwoMLPHead(TwoMLPHead):
    """fc6-ReLU and fc7-ReLU as modules, so each pair fuses into one INT8 LinearReLU."""

    def _init_quant(self) -> None:
        self.relu6 = nn.ReLU()
        self.relu7 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu7(self.fc7(self.relu6(self.fc6(x.flatten(start_dim=1)))))

    def fusion_groups(self) -> list[list[str]]:
        return [["fc6", "relu6"], ["fc7", "relu7"]]


class QuantizableFastRCNNPredictor(FastRCNNPredictor):
    """Class scores and box deltas from INT8 linears, dequantized for decoding."""

    def _init_quant(self) -> None:
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.dequant(self.cls_score(x)), self.dequant(self.bbox_pred(x))


class QuantizableFasterRCNN(QuantizableDetectorMixin, FasterRCNN):
    """torchvision's Faster R-CNN whose backbone, FPN, RPN head and box head run INT8 once converted."""

    neck_and_head_scopes = ("backbone.fpn", "rpn.head", "roi_heads.box_head")

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        quant_aware_anchors(self.rpn.anchor_generator)
        if type(self.rpn.head) is RPNHead:
            upgrade(self.rpn.head, QuantizableRPNHead)
        if type(self.roi_heads.box_roi_pool) is MultiScaleRoIAlign:
            upgrade(self.roi_heads.box_roi_pool, QuantizableMultiScaleRoIAlign)
        if type(self.roi_heads.box_head) is TwoMLPHead:
            upgrade(self.roi_heads.box_head, QuantizableTwoMLPHead)
        if type(self.roi_heads.box_predictor) is FastRCNNPredictor:
            upgrade(self.roi_heads.box_predictor, QuantizableFastRCNNPredictor)

    def head_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """RPN objectness and deltas per level, and box-head outputs for four fixed RoIs per image.

        Proposals come out of NMS (data-dependent); fixed RoIs (the whole image, two quadrants and
        the center) exercise RoIAlign and the INT8 box head the same way in PyTorch and ONNX.
        """
        image_list, _ = self.transform(list(images))
        features = self.backbone(image_list.tensors)
        objectness, deltas = self.rpn.head(list(features.values()))
        h, w = image_list.image_sizes[0]
        rois = torch.tensor(
            [[0, 0, w, h], [0, 0, w / 2, h / 2], [w / 2, h / 2, w, h], [w / 4, h / 4, 3 * w / 4, 3 * h / 4]],
            dtype=torch.float32,
        )
        pooled = self.roi_heads.box_roi_pool(features, [rois] * len(images), image_list.image_sizes)
        scores, box_deltas = self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))
        out = {f"objectness{i}": t for i, t in enumerate(objectness)}
        out |= {f"rpn_deltas{i}": t for i, t in enumerate(deltas)}
        return out | {"class_logits": scores, "box_regression": box_deltas}


def resnet50_fpn_v1_maker(model_class: type[FasterRCNN], weights_enum: Any) -> Callable[..., FasterRCNN]:
    """A builder of ``model_class`` on torchvision's R50-FPN v1 backbone (FrozenBatchNorm, eps 0 for COCO_V1)."""

    def make(
        *,
        weights: WeightsArg,
        weights_backbone: WeightsArg,
        trainable_backbone_layers: int | None,
        progress: bool,
        **kw: Any,
    ) -> FasterRCNN:
        backbone = resnet50_fpn(
            weights=weights,
            weights_backbone=weights_backbone,
            trainable_layers=trainable_backbone_layers,
            progress=progress,
        )
        model = model_class(backbone, **{"num_classes": 91, **kw})
        source = resolve_weights(weights, weights_enum)
        if source is not None and source.enum_member is weights_enum.COCO_V1:
            overwrite_eps(model, 0.0)  # as torchvision does for these weights
        return model

    return make


def resnet50_fpn_v2_maker(
    model_class: type[FasterRCNN], extra_heads: Callable[[int], dict[str, nn.Module]] = dict
) -> Callable[..., FasterRCNN]:
    """A builder of ``model_class`` as torchvision's v2 (BatchNorm backbone and FPN, conv RPN and box heads).

    Args:
        extra_heads: the further heads of ``model_class`` (e.g. Mask R-CNN's mask head) given the FPN's channels.
    """

    def make(
        *,
        weights: WeightsArg,
        weights_backbone: WeightsArg,
        trainable_backbone_layers: int | None,
        progress: bool,
        **kw: Any,
    ) -> FasterRCNN:
        backbone = resnet50_fpn(
            weights=weights,
            weights_backbone=weights_backbone,
            trainable_layers=trainable_backbone_layers,
            progress=progress,
            norm_layer=nn.BatchNorm2d,
            fpn_norm_layer=nn.BatchNorm2d,
        )
        channels = backbone.out_channels
        anchors = tv._default_anchorgen()
        heads = {
            "rpn_anchor_generator": anchors,
            "rpn_head": RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            "box_head": tv.FastRCNNConvFCHead((channels, 7, 7), [256, 256, 256, 256], [1024], nn.BatchNorm2d),
        }
        return model_class(backbone, **{"num_classes": 91, **kw}, **heads, **extra_heads(channels))

    return make


def _mobilenet(defaults: dict[str, Any]) -> Any:
    def make(
        *,
        weights: WeightsArg,
        weights_backbone: WeightsArg,
        trainable_backbone_layers: int | None,
        progress: bool,
        **kw: Any,
    ) -> QuantizableFasterRCNN:
        backbone = mobilenet_v3_large_fpn(
            weights=weights,
            weights_backbone=weights_backbone,
            trainable_layers=trainable_backbone_layers,
            progress=progress,
        )
        sizes = ((32, 64, 128, 256, 512),) * 3
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return QuantizableFasterRCNN(backbone, rpn_anchor_generator=anchors, **{"num_classes": 91, **defaults, **kw})

    return make


_BASE = detector_spec(
    "fasterrcnn_resnet50_fpn",
    "faster_rcnn",
    resnet50_fpn_v1_maker(QuantizableFasterRCNN, tv.FasterRCNN_ResNet50_FPN_Weights),
    tv.FasterRCNN_ResNet50_FPN_Weights,
    input_size=(800, 800),
    description="Faster R-CNN ResNet50-FPN (torchvision's architecture and weights)",
)
fasterrcnn_resnet50_fpn = define_model(_BASE)
fasterrcnn_resnet50_fpn_v2 = define_model(
    _BASE.variant(
        name="fasterrcnn_resnet50_fpn_v2",
        make_model=resnet50_fpn_v2_maker(QuantizableFasterRCNN),
        weights_enum=tv.FasterRCNN_ResNet50_FPN_V2_Weights,
        description="Faster R-CNN ResNet50-FPN v2 (torchvision's architecture and weights)",
    )
)
fasterrcnn_mobilenet_v3_large_fpn = define_model(
    _BASE.variant(
        name="fasterrcnn_mobilenet_v3_large_fpn",
        make_model=_mobilenet({"rpn_score_thresh": 0.05}),
        weights_enum=tv.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
        description="Faster R-CNN MobileNetV3-Large FPN (torchvision's architecture and weights)",
    )
)
fasterrcnn_mobilenet_v3_large_320_fpn = define_model(
    _BASE.variant(
        name="fasterrcnn_mobilenet_v3_large_320_fpn",
        make_model=_mobilenet(
            {
                "min_size": 320,
                "max_size": 640,
                "rpn_pre_nms_top_n_test": 150,
                "rpn_post_nms_top_n_test": 150,
                "rpn_score_thresh": 0.05,
            }
        ),
        weights_enum=tv.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
        input_size=(320, 320),
        description="Faster R-CNN MobileNetV3-Large 320 FPN, low resolution (torchvision's architecture and weights)",
    )
)
