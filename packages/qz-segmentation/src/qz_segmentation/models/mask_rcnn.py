"""Quantizable Mask R-CNN (ResNet50-FPN v1 and v2), built on qz-detection's quantizable Faster R-CNN.

INT8: backbone, FPN, RPN head, RoI box head and predictor, RoI mask head (``MaskRCNNHeads``) and mask
predictor (ConvTranspose2d, ReLU, 1x1 conv). Float: transform, anchors, proposal decoding and NMS, both
MultiScaleRoIAlign (float islands between stubs), box decoding, postprocess and mask pasting.

The mask predictor's ConvTranspose2d takes a per-tensor weight observer: eager mode refuses per-channel
weight observers for transposed convolutions ("Per channel weight observer is not supported yet for
ConvTranspose{n}d"), and x86's default qconfig is per-channel. PyTorch has no QAT ConvTranspose2d: in QAT
it trains in float (its output fake-quantized) and quantizes at convert. While PTQ observers calibrate, the
mask branch also runs on fixed RoIs, so it is calibrated even when no detection survives NMS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import (
    DeQuantStub,
    FakeQuantizeBase,
    ObserverBase,
    QConfig,
    default_weight_fake_quant,
    default_weight_observer,
)
from torch.nn import functional as F
from torchvision.models.detection import mask_rcnn as tv
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.transforms._presets import ObjectDetection

from qz_core import define_model
from qz_detection.detector import scale_boxes
from qz_detection.models._common import detection_loss_sum, detector_spec, upgrade
from qz_detection.models.faster_rcnn import (
    QuantizableFasterRCNN,
    QuantizableMultiScaleRoIAlign,
    resnet50_fpn_v1_maker,
    resnet50_fpn_v2_maker,
)
from qz_segmentation.instances import (
    MASK_THRESHOLD,
    InstancePrediction,
    InstanceTarget,
    register_instance_family,
)

__all__ = ["QuantizableMaskRCNN", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]

FAMILY = "mask_rcnn"
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def fixed_rois(height: int, width: int) -> Tensor:
    """The whole image, two quadrants and the center: RoIs that exercise RoIAlign and the heads without NMS."""
    h, w = height, width
    return torch.tensor(
        [[0, 0, w, h], [0, 0, w / 2, h / 2], [w / 2, h / 2, w, h], [w / 4, h / 4, 3 * w / 4, 3 * h / 4]],
        dtype=torch.float32,
    )


def per_tensor_weights(qconfig: QConfig | None) -> QConfig | None:
    """``qconfig`` with a per-tensor symmetric INT8 weight observer (fake-quant for QAT) for a per-channel one."""
    if qconfig is None or qconfig.weight is None:
        return qconfig
    weight = qconfig.weight()
    if getattr(weight, "qscheme", None) not in _PER_CHANNEL:
        return qconfig
    per_tensor = default_weight_fake_quant if isinstance(weight, FakeQuantizeBase) else default_weight_observer
    return QConfig(activation=qconfig.activation, weight=per_tensor)


class QuantizableMaskRCNNPredictor(MaskRCNNPredictor):
    """ConvTranspose2d, ReLU and the 1x1 logits conv in INT8; the logits dequantized for the float sigmoid.

    The qconfig that ``prepare`` hands down reaches ``conv5_mask`` with per-tensor weights
    (``per_tensor_weights``): whatever the engine's default, the transposed convolution quantizes.
    """

    def _init_quant(self) -> None:
        self.dequant = DeQuantStub()

    @property
    def qconfig(self) -> QConfig | None:
        if "_qz_qconfig" not in self.__dict__:
            raise AttributeError("qconfig")
        return self.__dict__["_qz_qconfig"]

    @qconfig.setter
    def qconfig(self, value: QConfig | None) -> None:
        self.__dict__["_qz_qconfig"] = value
        self.conv5_mask.qconfig = per_tensor_weights(value)

    @qconfig.deleter
    def qconfig(self) -> None:
        self.__dict__.pop("_qz_qconfig", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.mask_fcn_logits(self.relu(self.conv5_mask(x))))


class QuantizableMaskRCNN(QuantizableFasterRCNN, MaskRCNN):
    """torchvision's Mask R-CNN whose backbone, FPN, RPN head, box head and mask head run INT8 once converted.

    Implements ``qz_segmentation.instances.InstanceSegmenter``: the segmentation task dispatches to it.
    """

    neck_and_head_scopes = ("backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head")

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        if type(self.roi_heads.mask_roi_pool) is MultiScaleRoIAlign:
            upgrade(self.roi_heads.mask_roi_pool, QuantizableMultiScaleRoIAlign)
        if type(self.roi_heads.mask_predictor) is MaskRCNNPredictor:
            upgrade(self.roi_heads.mask_predictor, QuantizableMaskRCNNPredictor)

    def forward(self, images: Any, targets: Any = None) -> Any:
        """torchvision's forward; while PTQ observers calibrate, the mask branch also sees four fixed RoIs per image.

        The mask head runs only on the boxes that survive NMS and the score threshold: with none (random
        weights, or images without objects) its observers would see no data and keep default scales.
        """
        if not self.training and self._calibrating():
            self._observe_mask_branch(list(images))
        return super().forward(images, targets)

    def _calibrating(self) -> bool:
        observer = getattr(self.roi_heads.mask_predictor.mask_fcn_logits, "activation_post_process", None)
        return isinstance(observer, ObserverBase)

    def _observe_mask_branch(self, images: list[Tensor]) -> None:
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)
        rois = [fixed_rois(*size) for size in image_list.image_sizes]
        heads = self.roi_heads
        heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, rois, image_list.image_sizes)))

    def head_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Faster R-CNN's dense outputs (``QuantizableFasterRCNN.head_outputs``) and mask logits of the same RoIs."""
        image_list, _ = self.transform(list(images))
        features = self.backbone(image_list.tensors)
        objectness, deltas = self.rpn.head(list(features.values()))
        h, w = image_list.image_sizes[0]
        rois = [fixed_rois(h, w)] * len(images)
        heads = self.roi_heads
        sizes = image_list.image_sizes
        box_scores, box_deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, sizes)))
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, rois, sizes)))
        out = {f"objectness{i}": t for i, t in enumerate(objectness)}
        out |= {f"rpn_deltas{i}": t for i, t in enumerate(deltas)}
        return out | {"class_logits": box_scores, "box_regression": box_deltas, "mask_logits": mask_logits}

    def instance_loss(self, images: Tensor | list[Tensor], targets: Sequence[InstanceTarget]) -> Tensor:
        """The sum of torchvision's Mask R-CNN losses; boxes and masks mapped from original pixels to each image."""
        images = list(images)
        own = []
        for image, target in zip(images, targets, strict=True):
            size = tuple(image.shape[-2:])
            masks = target["masks"].to(torch.uint8)
            if tuple(masks.shape[-2:]) != size:
                masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].to(torch.uint8)
            boxes = scale_boxes(target["boxes"].float(), target["image_size"], size)
            own.append({"boxes": boxes, "labels": target["category_ids"], "masks": masks})
        return detection_loss_sum(self(images, own))

    def segment_instances(
        self, images: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[InstancePrediction]:
        """Boxes, labels, scores and boolean masks (probability >= ``MASK_THRESHOLD``) in original pixels."""
        predictions = []
        for image, out, size in zip(images, self(list(images)), image_sizes, strict=True):
            probabilities = out["masks"]
            if tuple(probabilities.shape[-2:]) != tuple(size):
                probabilities = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)
            predictions.append(
                {
                    "boxes": scale_boxes(out["boxes"], tuple(image.shape[-2:]), size),
                    "labels": out["labels"],
                    "scores": out["scores"],
                    "masks": probabilities[:, 0] >= MASK_THRESHOLD,
                }
            )
        return predictions


def _mask_head(channels: int) -> dict[str, nn.Module]:
    """torchvision v2's mask head: four conv-BatchNorm-ReLU blocks."""
    return {"mask_head": MaskRCNNHeads(channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)}


_BASE = detector_spec(
    "maskrcnn_resnet50_fpn",
    FAMILY,
    resnet50_fpn_v1_maker(QuantizableMaskRCNN, tv.MaskRCNN_ResNet50_FPN_Weights),
    tv.MaskRCNN_ResNet50_FPN_Weights,
    input_size=(800, 800),
    description="Mask R-CNN ResNet50-FPN, instance segmentation (torchvision's architecture and weights)",
).variant(task="segmentation", preprocess=ObjectDetection)
maskrcnn_resnet50_fpn = define_model(_BASE)
maskrcnn_resnet50_fpn_v2 = define_model(
    _BASE.variant(
        name="maskrcnn_resnet50_fpn_v2",
        make_model=resnet50_fpn_v2_maker(QuantizableMaskRCNN, _mask_head),
        weights_enum=tv.MaskRCNN_ResNet50_FPN_V2_Weights,
        description="Mask R-CNN ResNet50-FPN v2, instance segmentation (torchvision's architecture and weights)",
    )
)
register_instance_family(FAMILY)
