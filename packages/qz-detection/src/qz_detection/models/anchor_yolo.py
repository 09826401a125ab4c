"""Anchor-based YOLO heads and their training loss, parametrized by how the head decodes boxes.

``AnchorDetect`` is the head of the original (anchor-based) YOLOs: one 1x1 conv per level (INT8 once
converted), a ``DeQuantStub``, then decoding on float tensors: cell grid, anchors, sigmoid, NMS-ready
scores. ``AnchorYoloLoss`` is YOLOv5's loss (``utils/loss.py`` of release v7.0): targets matched to
anchors by width/height ratio, also claimed by neighbouring cells, CIoU box loss, BCE objectness with
the IoU as target, BCE classes. Both take a ``BoxDecoding``: ``YoloV5Decoding`` here; a darknet-style
decoding (``sigmoid * scale_x_y - (scale_x_y - 1) / 2``, ``exp(wh) * anchor``) plugs in the same way.

Nothing here imports ultralytics; ``AnchorYoloDetector.detect`` imports its NMS on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub
from torchvision.ops import box_convert, complete_box_iou_loss

from qz_core import estimate_bn_stats
from qz_detection.detector import Target
from qz_detection.models._letterbox import LetterboxDetector, YoloPredictions
from qz_detection.transforms import boxes_to_letterbox

__all__ = [
    "AnchorDetect",
    "AnchorLossWeights",
    "AnchorYoloDetector",
    "AnchorYoloLoss",
    "BoxDecoding",
    "YoloV5Decoding",
    "normalized_targets",
]


class BoxDecoding(Protocol):
    """How an anchor-based head turns one level's logits into boxes, at inference and in the loss.

    Attributes:
        neighbour_reach: a target within this fraction of a cell from the cell's edge is also assigned to
            the neighbouring cell (YOLOv5: 0.5, as its centres reach -0.5..1.5; 0 keeps the target's own cell).
    """

    neighbour_reach: float

    def decode(self, raw: Tensor, grid: Tensor, anchor_grid: Tensor, stride: float) -> Tensor:
        """(B, A, H, W, 5 + C) logits -> xywh in input pixels, objectness and class probabilities.

        ``grid`` holds each cell's (x, y) index, ``anchor_grid`` the anchors' (w, h) in input pixels.
        """
        ...

    def cell_boxes(self, xy: Tensor, wh: Tensor, anchors: Tensor) -> Tensor:
        """(N, 2) xy and wh logits of assigned predictions -> (N, 4) xywh in cells, xy from the cell's corner."""
        ...


@dataclass(frozen=True)
class YoloV5Decoding:
    """YOLOv5's decoding: ``xy = (2 sigmoid - 0.5 + grid) * stride``, ``wh = (2 sigmoid)^2 * anchor``."""

    neighbour_reach: float = 0.5

    def decode(self, raw: Tensor, grid: Tensor, anchor_grid: Tensor, stride: float) -> Tensor:
        """The operations, in the order, of YOLOv5's ``Detect.forward`` (so float outputs match it bit for bit)."""
        xy, wh, conf = raw.sigmoid().split((2, 2, raw.shape[-1] - 4), -1)
        xy = (xy * 2 + (grid - 0.5)) * stride
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), -1)

    def cell_boxes(self, xy: Tensor, wh: Tensor, anchors: Tensor) -> Tensor:
        """YOLOv5's ``ComputeLoss`` box: ``2 sigmoid(xy) - 0.5`` and ``(2 sigmoid(wh))^2 * anchor``."""
        return torch.cat((xy.sigmoid() * 2 - 0.5, (wh.sigmoid() * 2) ** 2 * anchors), 1)


class AnchorDetect(nn.Module):
    """Anchor-based detection head: 1x1 convs (INT8 once converted), then float decoding.

    State-dict keys are the original YOLOv5 ``Detect``'s: ``m.{level}.weight``/``bias`` and ``anchors``
    (nl, na, 2) in units of each level's stride.

    Outputs: in training, the raw levels (B, na, H, W, 5 + C); in eval, ``(predictions, raw)`` where
    ``predictions`` (B, 4 + C, anchors) holds xywh boxes in input pixels and objectness x class
    probability (what ultralytics' NMS and qz's YOLO evaluation take) and ``raw`` is
    ``{"decoded": (B, anchors, 5 + C) as the original model returns, "levels": raw levels}``; with
    ``export`` only ``predictions``.
    """

    def __init__(
        self,
        num_classes: int,
        anchors: Sequence[Sequence[float]],
        channels: Sequence[int],
        strides: Sequence[int],
        decoding: BoxDecoding,
    ) -> None:
        super().__init__()
        self.nc, self.no = num_classes, num_classes + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        self.decoding = decoding
        self.export = False
        stride = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("stride", stride, persistent=False)
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2) / stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self.dequant = DeQuantStub()

    @torch.no_grad()
    def initialize_biases(self, image_size: int = 640) -> None:
        """YOLOv5's prior: about 8 objects per 640 px image, class probability 0.6 / classes."""
        for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
            bias = conv.bias.view(self.na, -1)
            bias[:, 4] += math.log(8 / (image_size / stride) ** 2)
            bias[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, x: list[Tensor]) -> Any:
        levels = [self._level(i, feature) for i, feature in enumerate(x)]
        if self.training:
            return levels
        decoded = torch.cat([self._decode(i, level) for i, level in enumerate(levels)], 1)
        predictions = torch.cat((decoded[..., :4], decoded[..., 5:] * decoded[..., 4:5]), -1).transpose(1, 2)
        return predictions if self.export else (predictions, {"decoded": decoded, "levels": levels})

    def _level(self, i: int, feature: Tensor) -> Tensor:
        out = self.dequant(self.m[i](feature))
        batch, _, height, width = out.shape
        return out.view(batch, self.na, self.no, height, width).permute(0, 1, 3, 4, 2).contiguous()

    def _decode(self, i: int, level: Tensor) -> Tensor:
        batch, _, height, width, _ = level.shape
        shape = 1, self.na, height, width, 2
        ys = torch.arange(height, device=level.device, dtype=level.dtype)
        xs = torch.arange(width, device=level.device, dtype=level.dtype)
        y_grid, x_grid = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((x_grid, y_grid), 2).expand(shape)
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(shape)
        decoded = self.decoding.decode(level, grid, anchor_grid, float(self.stride[i]))
        return decoded.view(batch, self.na * height * width, self.no)


@dataclass(frozen=True)
class AnchorLossWeights:
    """YOLOv5's loss hyperparameters (``hyp.scratch-low.yaml``), before train.py scales them.

    Attributes:
        box, obj, cls: gains of the box, objectness and class losses.
        anchor_t: a target is assigned to anchors whose width and height ratios to it are below this.
        balance: objectness gain per level (P3, P4, P5).
    """

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    balance: tuple[float, ...] = (4.0, 1.0, 0.4)


@dataclass
class _Assigned:
    """The predictions one level's targets are assigned to, and what each should predict."""

    image: Tensor
    anchor: Tensor
    gj: Tensor
    gi: Tensor
    box: Tensor
    anchors: Tensor
    cls: Tensor


class AnchorYoloLoss:
    """YOLOv5's training loss (release v7.0 ``ComputeLoss``) for an ``AnchorDetect``-like head.

    The head gives ``anchors`` (nl, na, 2) in stride units, ``stride`` and ``nc``; ``decoding`` is
    the head's own unless given. Gains are scaled as YOLOv5's train.py does: classes by ``nc / 80``,
    objectness by ``(image size / 640)^2``, all by ``3 / levels``.
    """

    def __init__(
        self,
        head: nn.Module,
        weights: AnchorLossWeights = AnchorLossWeights(),
        decoding: BoxDecoding | None = None,
    ) -> None:
        self.head = head
        self.weights = weights
        self.decoding = decoding if decoding is not None else head.decoding
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, levels: Sequence[Tensor], targets: Tensor) -> Tensor:
        """The loss of raw head outputs against ``targets`` (N, 6): image index, class, normalized xywh."""
        box, obj, cls = self.components(levels, targets)
        return (box + obj + cls) * levels[0].shape[0]

    def components(self, levels: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The weighted box, objectness and class losses (each a scalar tensor)."""
        device = levels[0].device
        box_loss, obj_loss, cls_loss = (torch.zeros((), device=device) for _ in range(3))
        for i, level in enumerate(levels):
            assigned = self._assign(i, level, targets.to(device))
            target_obj = torch.zeros(level.shape[:4], dtype=level.dtype, device=device)
            if len(assigned.image):
                pred = level[assigned.image, assigned.anchor, assigned.gj, assigned.gi]
                pxy, pwh, _, pcls = pred.split((2, 2, 1, self.head.nc), 1)
                boxes = self.decoding.cell_boxes(pxy, pwh, assigned.anchors)
                iou = _ciou(boxes, assigned.box)
                box_loss = box_loss + (1.0 - iou).mean()
                target_obj[assigned.image, assigned.anchor, assigned.gj, assigned.gi] = iou.detach().clamp(0)
                if self.head.nc > 1:
                    target_cls = torch.zeros_like(pcls)
                    target_cls[torch.arange(len(pcls), device=device), assigned.cls] = 1.0
                    cls_loss = cls_loss + self.bce(pcls, target_cls)
            obj_loss = obj_loss + self.bce(level[..., 4], target_obj) * self.weights.balance[i]
        return self._weighted(box_loss, obj_loss, cls_loss, levels)

    def _weighted(self, box: Tensor, obj: Tensor, cls: Tensor, levels: Sequence[Tensor]) -> tuple[Tensor, ...]:
        per_level = 3 / len(levels)
        image_size = levels[0].shape[2] * float(self.head.stride[0])
        box = box * self.weights.box * per_level
        obj = obj * self.weights.obj * (image_size / 640) ** 2 * per_level
        cls = cls * self.weights.cls * self.head.nc / 80 * per_level
        return box, obj, cls

    def _assign(self, i: int, level: Tensor, targets: Tensor) -> _Assigned:
        """YOLOv5's ``build_targets`` for one level: anchor-ratio matching, then the neighbouring cells."""
        anchors, (height, width) = self.head.anchors[i].to(level.device), level.shape[2:4]
        gain = torch.tensor([1, 1, width, height, width, height], dtype=targets.dtype, device=level.device)
        scaled = targets * gain  # (N, 6) with xywh in cells
        na = anchors.shape[0]
        anchor_index = torch.arange(na, dtype=targets.dtype, device=level.device).repeat_interleave(len(targets))
        pairs = torch.cat((scaled.repeat(na, 1), anchor_index[:, None]), 1)  # (na * N, 7), anchor-major
        ratio = pairs[:, 4:6] / anchors[pairs[:, 6].long()]
        pairs = pairs[torch.max(ratio, 1 / ratio).max(1)[0] < self.weights.anchor_t]
        pairs, offsets = _with_neighbours(pairs, (width, height), self.decoding.neighbour_reach)
        gxy = pairs[:, 2:4]
        cell = (gxy - offsets).long()
        gi, gj = cell[:, 0].clamp(0, width - 1), cell[:, 1].clamp(0, height - 1)
        anchor = pairs[:, 6].long()
        return _Assigned(
            image=pairs[:, 0].long(),
            anchor=anchor,
            gj=gj,
            gi=gi,
            box=torch.cat((gxy - cell, pairs[:, 4:6]), 1),
            anchors=anchors[anchor],
            cls=pairs[:, 1].long(),
        )


def _with_neighbours(pairs: Tensor, size: tuple[int, int], reach: float) -> tuple[Tensor, Tensor]:
    """Each (target, anchor) pair, plus a copy per neighbouring cell its centre lies within ``reach`` of.

    Returns the pairs and the offset (in cells) subtracted from each centre to find its cell.
    """
    gxy = pairs[:, 2:4]
    far = torch.tensor(size, dtype=pairs.dtype, device=pairs.device) - gxy
    near_low = (gxy % 1 < reach) & (gxy > 1)  # left, top neighbours
    near_high = (far % 1 < reach) & (far > 1)  # right, bottom neighbours
    keep = torch.stack((torch.ones_like(near_low[:, 0]), *near_low.T, *near_high.T))
    steps = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=pairs.dtype, device=pairs.device)
    offsets = (torch.zeros_like(gxy)[None] + steps[:, None] * reach)[keep]
    return pairs.repeat((5, 1, 1))[keep], offsets


def _ciou(boxes: Tensor, targets: Tensor) -> Tensor:
    """Complete IoU of paired xywh boxes."""
    xyxy = box_convert(boxes, "cxcywh", "xyxy"), box_convert(targets, "cxcywh", "xyxy")
    return 1.0 - complete_box_iou_loss(*xyxy, reduction="none", eps=1e-7)


def normalized_targets(targets: Sequence[Target], input_size: tuple[int, int]) -> Tensor:
    """(N, 6) rows ``image index, class, x, y, w, h`` (xywh normalized to the letterboxed input) of qz targets."""
    rows = []
    for i, target in enumerate(targets):
        xyxy = boxes_to_letterbox(target["boxes"].float(), tuple(target["image_size"]), input_size)
        xywh = box_convert(xyxy, "xyxy", "cxcywh") / torch.tensor([input_size[1], input_size[0]] * 2)
        index = torch.full((len(xywh), 1), float(i))
        rows.append(torch.cat((index, target["labels"].float().view(-1, 1), xywh), 1))
    return torch.cat(rows) if rows else torch.zeros(0, 6)


class AnchorYoloDetector(LetterboxDetector):
    """The ``QuantizableDetector`` methods of a letterboxed anchor-based YOLO whose last layer is an ``AnchorDetect``.

    The class mixes into an ``nn.Module`` with ``model`` (a Sequential ending in the head).

    Attributes:
        conf_thres, iou_thres, max_det: ``detect``'s NMS settings (YOLOv5's detect.py defaults).
    """

    model: nn.Sequential

    @property
    def head(self) -> AnchorDetect:
        """The anchor-based Detect head."""
        return self.model[-1]

    def detection_loss(self, images: Tensor | list[Tensor], targets: Sequence[Target]) -> Tensor:
        """YOLOv5's loss (``AnchorYoloLoss``); target boxes are mapped into the letterboxed input."""
        x = images if isinstance(images, Tensor) else self.detection_inputs(images)
        return AnchorYoloLoss(self.head)(self(x), normalized_targets(targets, tuple(x.shape[-2:])))

    def export_module(self) -> nn.Module:
        """The model itself with the head's ``export``, else a wrapper returning its predictions only."""
        return self if self.head.export else YoloPredictions(self)

    def settle_random_weights(self, inputs: Sequence[Any]) -> None:
        """BatchNorm statistics from ``inputs``."""
        estimate_bn_stats(self, list(inputs))
