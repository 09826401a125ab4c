"""Quantizable YOLOv4 and YOLOv4-tiny built from darknet cfgs, loading darknet ``.weights`` files.

``QuantizableYOLOv4`` is ``DarknetYOLO`` (``qz_detection.models.darknet``) with a QuantStub in front:
every conv (conv-bn fused) runs in INT8, LeakyReLU with its quantized kernel, shortcut adds and route
concats through ``FloatFunctional``, route channel groups as slices of INT8 tensors, the SPP max
pools and the nearest upsampling on INT8 tensors. Mish, which has no quantized kernel, is one float
island per Mish layer (``FloatIsland``: dequantize, ``x * tanh(softplus(x))``, quantize), which INT8 eager
PyTorch runs as a 256-entry lookup of the island's own result; decompositions into quantized ops lose
accuracy, or do not export to ONNX, or are slower (``QuantizableMish`` has the measurements).
After a DeQuantStub the ``[yolo]`` decoding stays float: grid, ``scale_x_y``, anchors, scores.
Unconverted, the model computes exactly what ``DarknetYOLO`` computes.

Weights: a darknet ``.weights`` file (AlexeyAB's ``yolov4.weights``, ``yolov4-tiny.weights`` or one
trained on a user's cfg, passed with ``cfg=``), or a state dict file. ``yolov4_detection_loss`` is the
QAT loss: YOLOv5's anchor assignment by box/anchor size ratio, CIoU box loss, BCE objectness and class,
on boxes decoded by darknet's rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.ops import batched_nms, box_convert, complete_box_iou_loss

from qz_core import (
    BuildContext,
    FloatIsland,
    LoadedWeights,
    ModelSpec,
    QzError,
    define_model,
    estimate_bn_stats,
    fuse_modules,
    read_checkpoint,
)
from qz_core.fusion import check_fuse_level
from qz_detection.detector import Detection, Target
from qz_detection.models._letterbox import LetterboxDetector, YoloPredictions
from qz_detection.models.darknet import (
    BUILTIN_CFGS,
    ConvBlock,
    DarknetWeights,
    DarknetYOLO,
    Route,
    Shortcut,
    YoloLayer,
)
from qz_detection.transforms import LetterBox, boxes_from_letterbox, boxes_to_letterbox

__all__ = ["QuantizableMish", "QuantizableYOLOv4", "yolov4", "yolov4_detection_loss", "yolov4_tiny"]

ANCHOR_RATIO = 4.0  # YOLOv5's anchor_t: a box matches anchors within 4x of its width and height
MAX_LOG_WH = 8.0  # exp() bound of the loss's box sizes (e^8 ~ 3000 anchors): keeps random-weight losses finite
LOSS_GAINS = {"box": 0.05, "obj": 1.0, "cls": 0.5}  # YOLOv5's hyp.scratch gains
OBJ_BALANCE = {8: 4.0, 16: 1.0, 32: 0.4}  # YOLOv5's objectness weight per stride


class QuantizableMish(FloatIsland):
    """Mish as a float island (dequantize, ``F.mish``, quantize), run in INT8 eager mode as a 256-entry lookup.

    Unprepared it is exactly ``F.mish``. Converted, an INT8 input has 256 possible values, so the island's
    output is a table of them: eager PyTorch indexes that table (the island's result, ``use_lookup``),
    ONNX export traces the island itself (DequantizeLinear, Mish as Softplus/Tanh/Mul, QuantizeLinear).

    Measured on (1, 64, 76, 76) and (1, 256, 38, 38) activations, one thread, against float Mish, side by
    side on a shared machine (relative times, island = 1): the island keeps 33.0 dB SQNR on x86 (7-bit
    activations) and 38.8 dB on qnnpack; the lookup the same 33.0 / 38.8 dB in 0.2-0.8x. Decompositions
    into quantized ops: ``x * sigmoid(1.26 x + 0.57)`` 30.0 / 33.4 dB in 0.06-0.3x; ``x * (w sigmoid(a1 x +
    b1) + (1 - w) sigmoid(a2 x + b2))`` 32.5 / 38.4 dB in 0.1-0.5x, but ``quantized::mul_scalar`` and
    ``add_scalar`` have no ONNX symbolic; the same with the affine maps as grouped 1x1 convs exports, at
    32.8 / 37.9 dB, in 1.6-8.5x. None is faster at the same error and exportable, so the island stays.
    """

    use_lookup = True

    def __init__(self) -> None:
        super().__init__(nn.Mish())
        self.tables: dict[tuple[float, int], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        converted = isinstance(self.quant, nnq.Quantize) and x.is_quantized and x.dtype == torch.quint8
        if converted and self.use_lookup and not torch.onnx.is_in_onnx_export():
            return self._lookup(x)
        return super().forward(x)

    def _lookup(self, x: Tensor) -> Tensor:
        key = (x.q_scale(), x.q_zero_point())
        table = self.tables.get(key)
        scale, zero_point = float(self.quant.scale), int(self.quant.zero_point)
        if table is None:
            levels = (torch.arange(256, dtype=torch.float32) - key[1]) * key[0]
            table = torch.quantize_per_tensor(self.module(levels), scale, zero_point, torch.quint8).int_repr()
            self.tables[key] = table
        return torch._make_per_tensor_quantized_tensor(table[x.int_repr().long()], scale, zero_point)


class QuantizableRoute(Route):
    """A ``[route]`` whose concat runs through ``FloatFunctional`` (a channel slice stays a plain slice)."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat (where the route joins more than one layer)."""
        if len(self.sources) > 1:
            self.cat = FloatFunctional()

    def forward(self, saved: dict[int, Tensor]) -> Tensor:
        picked = self.pick(saved)
        return picked[0] if len(picked) == 1 else self.cat.cat(picked, 1)


class QuantizableShortcut(Shortcut):
    """A ``[shortcut]`` whose add runs through ``FloatFunctional``."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable add."""
        self.skip_add = FloatFunctional()

    def forward(self, x: Tensor, saved: dict[int, Tensor]) -> Tensor:
        return self.skip_add.add(x, saved[self.source])


class QuantizableYOLOv4(LetterboxDetector, DarknetYOLO):
    """``DarknetYOLO`` with a QuantStub in front, INT8 routes and shortcuts, Mish as float islands.

    Args:
        cfg: a shipped cfg name (``"yolov4.cfg"``, ``"yolov4-tiny.cfg"``), a cfg file or cfg text.
        num_classes: classes of every ``[yolo]`` layer; the cfg's when None.
        export: in eval, return only the decoded predictions.

    Attributes:
        conf_thres, iou_thres, max_det: ``detect``'s NMS settings (darknet's and ultralytics' predict defaults).
    """

    def __init__(self, cfg: str | os.PathLike = "yolov4.cfg", num_classes: int | None = None, export: bool = False):
        super().__init__(cfg, num_classes, export)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()
        for layer in self.layers:
            quantizable = {Route: QuantizableRoute, Shortcut: QuantizableShortcut}.get(type(layer))
            if quantizable is not None:
                layer.__class__ = quantizable
                layer.init_quant_ops()
            if isinstance(layer, ConvBlock) and type(layer.act) is nn.Mish:
                layer.act = QuantizableMish()
        self.eval()

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input quantized (an identity until prepared)."""
        return self.quant(x)

    def float_raw(self, raw: list[Tensor]) -> list[Tensor]:
        """The raw head maps dequantized for the float decoding."""
        return [self.dequant(r) for r in raw]

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn (and ReLU) of every conv ('all') or of those inside residual units ('blocks')."""
        level = check_fuse_level(level)
        if level == "none":
            return
        inside = _residual_layers(self) if level == "blocks" else None
        groups = []
        for index, block in self.conv_blocks():
            if not isinstance(block.bn, nn.BatchNorm2d) or (inside is not None and index not in inside):
                continue
            relu = [f"layers.{index}.act"] if type(block.act) is nn.ReLU else []
            groups.append([f"layers.{index}.conv", f"layers.{index}.bn", *relu])
        fuse_modules(self, groups, is_qat)

    def detection_loss(self, images: Tensor | list[Tensor], targets: Sequence[Target]) -> Tensor:
        """``yolov4_detection_loss`` of the head maps; target boxes are mapped into the letterboxed input."""
        x = images if isinstance(images, Tensor) else self.detection_inputs(images)
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        labels = [
            torch.cat(
                [t["labels"].float().view(-1, 1), boxes_to_letterbox(t["boxes"].float(), t["image_size"], input_size)],
                1,
            )
            for t in targets
        ]
        return yolov4_detection_loss(self.yolo_layers, self.head_maps(x), labels, input_size)

    def detect(self, images: Tensor | list[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Detection]:
        """Class-wise NMS on the decoded predictions, boxes taken back through the letterbox."""
        predictions, input_size = self.predictions(images)
        return [self._nms(p, size, input_size) for p, size in zip(predictions, image_sizes, strict=True)]

    def _nms(self, predictions: Tensor, image_size: tuple[int, int], input_size: tuple[int, int]) -> Detection:
        scores, labels = predictions[4:].max(0)
        keep = scores > self.conf_thres
        boxes = box_convert(predictions[:4, keep].T, "cxcywh", "xyxy")
        scores, labels = scores[keep], labels[keep]
        kept = batched_nms(boxes, scores, labels, self.iou_thres)[: self.max_det]
        return {
            "boxes": boxes_from_letterbox(boxes[kept], image_size, input_size),
            "labels": labels[kept],
            "scores": scores[kept],
        }

    def export_module(self) -> nn.Module:
        """The model itself with ``export=True``, else a wrapper returning its predictions only."""
        return self if self.export else YoloPredictions(self)

    def settle_random_weights(self, inputs: Sequence[Any]) -> None:
        """BatchNorm statistics from ``inputs`` (the head biases already start at darknet-like priors)."""
        estimate_bn_stats(self, list(inputs))


def _input_labels(target: Target, input_size: tuple[int, int]) -> Tensor:
    """(N, 5) rows of class index and xyxy box in the letterboxed input's pixels."""
    boxes = boxes_to_letterbox(target["boxes"].float(), tuple(target["image_size"]), input_size)
    return torch.cat([target["labels"].float().view(-1, 1), boxes], 1)


def _residual_layers(model: DarknetYOLO) -> set[int]:
    """Indices of the layers inside residual units: between each ``[shortcut]`` and the layer it adds."""
    inside: set[int] = set()
    for index, layer in enumerate(model.layers):
        if isinstance(layer, Shortcut):
            inside.update(range(layer.source + 1, index))
    return inside


# --- Loss -------------------------------------------------------------------------------------------


def _assign(head: YoloLayer, labels: Sequence[Tensor], stride: Tensor, grid: tuple[int, int]) -> tuple[Tensor, ...]:
    """Matches of every labelled box to this head's anchors (within ``ANCHOR_RATIO`` in width and height).

    Returns:
        image, anchor, cell row and cell column indices, the boxes (xyxy, input pixels) and class indices.
    """
    rows: list[list[Tensor]] = [[] for _ in range(6)]
    height, width = grid
    for image, boxes in enumerate(labels):
        if not len(boxes):
            continue
        centre = (boxes[:, 1:3] + boxes[:, 3:5]) / 2
        size = (boxes[:, 3:5] - boxes[:, 1:3]).clamp(min=1e-6)
        ratio = size[:, None] / head.anchors[None]
        box, anchor = (torch.max(ratio, 1 / ratio).amax(-1) < ANCHOR_RATIO).nonzero(as_tuple=True)
        cell = (centre[box] / stride).long()
        for i, part in enumerate(
            (
                torch.full_like(box, image),
                anchor,
                cell[:, 1].clamp(0, height - 1),
                cell[:, 0].clamp(0, width - 1),
                boxes[box, 1:5],
                boxes[box, 0].long(),
            )
        ):
            rows[i].append(part)
    if not rows[0]:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty, empty, torch.zeros(0, 4), empty
    return tuple(torch.cat(r) for r in rows)


def yolov4_detection_loss(
    heads: Sequence[YoloLayer], raw: Sequence[Tensor], labels: Sequence[Tensor], input_size: tuple[int, int]
) -> Tensor:
    """YOLOv4's training loss on the raw head maps, as YOLOv5 computes it on darknet's decoding.

    Each box is assigned, in the cell holding its centre, to every anchor of every head within
    ``ANCHOR_RATIO`` of its width and height (YOLOv5's rule). Matched predictions are decoded by the
    head's own rules (``scale_x_y``, ``exp(t_wh) * anchor``) and scored by CIoU; objectness is BCE
    towards the matched boxes' CIoU (zero elsewhere), weighted per stride; classes are BCE. Gains and
    their scaling are YOLOv5's (as ``anchor_yolo.AnchorYoloLoss`` has them). That loss is not reused:
    its ``BoxDecoding`` is one for all levels, and darknet's ``scale_x_y`` differs per ``[yolo]`` layer.

    Args:
        heads: the model's ``[yolo]`` layers.
        raw: their float input maps (B, A * (5 + C), H, W).
        labels: per image, (N, 5) rows of class index and xyxy box in input pixels.
        input_size: (H, W) of the input.
    """
    box_loss, obj_loss, cls_loss = raw[0].new_zeros(()), raw[0].new_zeros(()), raw[0].new_zeros(())
    for head, maps in zip(heads, raw, strict=True):
        p = head.split(maps)
        _, _, h, w, _ = p.shape
        stride = torch.tensor([input_size[1] / w, input_size[0] / h])
        image, anchor, gy, gx, boxes, classes = _assign(head, labels, stride, (h, w))
        objectness = torch.zeros_like(p[..., 4])
        if len(image):
            matched = p[image, anchor, gy, gx]
            cells = torch.stack([gx, gy], 1).to(matched.dtype)
            t_wh = matched[:, 2:4].clamp(max=MAX_LOG_WH)
            decoded = head.boxes(matched[:, 0:2], t_wh, cells, stride, head.anchors[anchor])
            ciou = complete_box_iou_loss(box_convert(decoded, "cxcywh", "xyxy"), boxes, reduction="none")
            box_loss = box_loss + ciou.mean()
            objectness[image, anchor, gy, gx] = (1 - ciou).detach().clamp(0).to(objectness.dtype)
            one_hot = F.one_hot(classes, head.classes).to(matched.dtype)
            cls_loss = cls_loss + F.binary_cross_entropy_with_logits(matched[:, 5:], one_hot)
        balance = OBJ_BALANCE.get(round(float(stride[0])), 1.0)
        obj_loss = obj_loss + balance * F.binary_cross_entropy_with_logits(p[..., 4], objectness)
    # YOLOv5's train.py scaling: classes by C / 80, objectness by (image size / 640)^2, all by 3 / heads.
    obj_scale = (max(input_size) / 640) ** 2
    total = (
        LOSS_GAINS["box"] * box_loss
        + LOSS_GAINS["obj"] * obj_scale * obj_loss
        + LOSS_GAINS["cls"] * heads[0].classes / 80 * cls_loss
    )
    return total * 3 / len(heads) * len(raw[0])


# --- Registration -------------------------------------------------------------------------------------


def read_darknet_or_state_dict(context: BuildContext) -> LoadedWeights:
    """The specs' ``read_weights`` hook: a darknet ``.weights`` file (split by the model) or a state dict file."""
    assert context.source is not None and context.source.path is not None
    path = context.source.path
    if path.suffix == ".weights":
        return LoadedWeights(DarknetWeights(path))
    return LoadedWeights(read_checkpoint(path))


def use_cfg(default: str, context: BuildContext, kwargs: dict[str, Any]) -> None:
    """The specs' ``adjust_kwargs`` hook: the variant's cfg unless one is given; a cfg file is stored as its text.

    The build recipe then rebuilds the network (``qz_core.load_quantized``) without the cfg file.
    """
    cfg = os.fspath(kwargs.setdefault("cfg", default))
    if cfg not in BUILTIN_CFGS and "\n" not in cfg:
        path = Path(cfg).expanduser()
        if not path.is_file():
            raise QzError(f"darknet cfg {cfg!r} is neither one of {', '.join(BUILTIN_CFGS)} nor an existing file.")
        kwargs["cfg"] = path.read_text()


def _spec(name: str, cfg: str, size: int, description: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        task="detection",
        family="yolo",
        make_model=QuantizableYOLOv4,
        input_size=(size, size),
        read_weights=read_darknet_or_state_dict,
        adjust_kwargs=partial(use_cfg, cfg),
        preprocess=partial(LetterBox, size),
        deployed_ratio_target=0.4,
        probe_kwargs={"export": True},
        description=f"{description} (darknet {cfg} or cfg=...; weights: darknet .weights or a state dict)",
    )


yolov4 = define_model(_spec("yolov4", "yolov4.cfg", 608, "YOLOv4: CSPDarknet53, SPP, PANet, Mish"))
yolov4_tiny = define_model(_spec("yolov4_tiny", "yolov4-tiny.cfg", 416, "YOLOv4-tiny"))
