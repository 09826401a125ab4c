"""``QuantizableYOLO``: ultralytics' ``DetectionModel`` made quantizable (imported on first build, not at registration).

This module imports ultralytics (through ``qz_detection._ultralytics``, which undoes its global
patches); ``qz_detection.models.yolo`` registers the variants without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import QuantStub

from qz_core import QzError, estimate_bn_stats, fuse_modules, replace_silu
from qz_core.fusion import check_fuse_level
from qz_detection._ultralytics import import_ultralytics
from qz_detection.detector import Target
from qz_detection.models._letterbox import LetterboxDetector, YoloPredictions
from qz_detection.models.yolo_blocks import FUSE_SCOPES, conv_bn_groups, swap_blocks
from qz_detection.transforms import boxes_to_letterbox

__all__ = ["QuantizableYOLO", "YoloPredictions", "read_ultralytics_checkpoint", "yolo_detection_loss"]

DetectionModel = import_ultralytics("ultralytics.nn.tasks").DetectionModel


@contextlib.contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class QuantizableYOLO(LetterboxDetector, DetectionModel):
    """ultralytics' ``DetectionModel`` with a QuantStub in front and quantizable blocks.

    Args:
        cfg: an ultralytics model config: a name such as ``"yolov5n.yaml"`` or ``"yolo11n.yaml"`` (the
            scale letter picks depth and width from ``yolov5.yaml``, ``yolo11.yaml``) or a config dict.
        num_classes: number of classes of the Detect head.
        in_channels: input image channels.
        export: return only the decoded predictions in eval (ultralytics' ``Detect.export``).

    Attributes:
        conf_thres, iou_thres, max_det: ``detect``'s NMS settings (ultralytics' predict defaults).

    Raises:
        QzError: the config uses blocks qz has no quantizable version of (YOLOv10's SCDown, YOLO12's A2C2f...).
    """

    def __init__(self, cfg: str | dict, num_classes: int = 80, in_channels: int = 3, export: bool = False) -> None:
        with _quiet_ultralytics():  # its 'Overriding model.yaml nc=80 with nc=N' is not news: num_classes says so
            super().__init__(cfg, ch=in_channels, nc=num_classes, verbose=False)
        swap_blocks(self)
        replace_silu(self)
        self.quant = QuantStub()
        self.model[-1].export = export
        self.eval()

    def _predict_once(self, x: Tensor, profile: bool = False, embed: list[int] | None = None) -> Any:
        quant = self._modules.get("quant")  # absent while ultralytics' __init__ runs its stride probe
        return super()._predict_once(quant(x) if quant is not None else x, profile, embed)

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn of every Conv ('all') or of those inside the residual/CSP/SPP/attention blocks ('blocks').

        SiLU does not fuse: it follows the fused conv as a quantized sigmoid and multiply.
        """
        if check_fuse_level(level) == "none":
            return
        fuse_modules(self, conv_bn_groups(self, None if level == "all" else FUSE_SCOPES), is_qat)

    def detection_loss(self, images: Tensor | list[Tensor], targets: Sequence[Target]) -> Tensor:
        """ultralytics' detection loss; target boxes are mapped into the letterboxed input."""
        x = images if isinstance(images, Tensor) else self.detection_inputs(images)
        return yolo_detection_loss(self)(self(x), yolo_labels(targets, tuple(x.shape[-2:])))

    def export_module(self) -> nn.Module:
        """The model itself with ``export=True``, else a wrapper returning its predictions only."""
        return self if self.model[-1].export else YoloPredictions(self)

    def settle_random_weights(self, inputs: Sequence[Any]) -> None:
        """BatchNorm statistics from ``inputs`` (ultralytics' initialization is already of order one)."""
        estimate_bn_stats(self, list(inputs))


def yolo_labels(targets: Sequence[Target], input_size: tuple[int, int]) -> dict[str, Tensor]:
    """ultralytics' label dict (``batch_idx``, ``cls``, ``bboxes`` as normalized xywh) of targets in original pixels."""
    index, classes, boxes = [], [], []
    for i, target in enumerate(targets):
        xyxy = boxes_to_letterbox(target["boxes"].float(), tuple(target["image_size"]), input_size)
        xyxy = xyxy / torch.tensor([input_size[1], input_size[0]] * 2)
        boxes.append(torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1))
        classes.append(target["labels"].float().view(-1, 1))
        index.append(torch.full((len(xyxy),), float(i)))
    return {"batch_idx": torch.cat(index), "cls": torch.cat(classes), "bboxes": torch.cat(boxes)}


def yolo_detection_loss(model: nn.Module) -> Callable[[Any, Mapping[str, Tensor]], Tensor]:
    """ultralytics' YOLO detection loss (box IoU, class BCE, DFL) as ``loss_fn(outputs, targets)``.

    ``targets`` is ultralytics' label dict: ``batch_idx`` (N,), ``cls`` (N, 1) and ``bboxes`` (N, 4)
    as normalized xywh. ``model`` gets ultralytics' default hyperparameters as ``model.args`` if it has none.
    """
    get_cfg = import_ultralytics("ultralytics.cfg").get_cfg
    v8_detection_loss = import_ultralytics("ultralytics.utils.loss").v8DetectionLoss
    if not hasattr(model, "args"):
        model.args = get_cfg()
    criterion = v8_detection_loss(model)

    def loss_fn(outputs: Any, targets: Mapping[str, Tensor]) -> Tensor:
        return criterion(outputs, dict(targets))[0].sum()

    return loss_fn


def read_ultralytics_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float state dict, ``num_classes`` and ``names`` of an ultralytics ``.pt`` checkpoint.

    Read with ultralytics' ``torch_safe_load(safe_only=True)``: ``torch.load(weights_only=True)``
    against its allow-list of its own and torch's classes, so no arbitrary code runs.

    Raises:
        QzError: the file does not load that way, or holds no model.
    """
    torch_safe_load = import_ultralytics("ultralytics.nn.tasks").torch_safe_load
    try:
        checkpoint, _ = torch_safe_load(str(path), safe_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means 'not a checkpoint qz can read safely'
        raise QzError(
            f"Cannot read YOLO weights {str(path)!r}: not an ultralytics checkpoint that loads with "
            f"weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "See qz_detection.models.yolo.read_yolo_checkpoint for converting a trusted file."
        ) from exc
    model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, Mapping) else None
    if not isinstance(model, nn.Module):
        raise QzError(f"ultralytics checkpoint {str(Path(path))!r} holds no model under 'ema' or 'model'.")
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {}
    detect = model.model[-1] if hasattr(model, "model") else None
    if detect is not None and hasattr(detect, "nc"):
        meta["num_classes"] = int(detect.nc)
    names = getattr(model, "names", None)
    if isinstance(names, Mapping):
        meta["names"] = [str(names[k]) for k in sorted(names)]
    elif isinstance(names, (list, tuple)):
        meta["names"] = [str(n) for n in names]
    return state, meta
