"""What every letterboxed YOLO (ultralytics', anchor-based YOLOv5, darknet YOLOv4) does the same way as a detector.

They take letterboxed images of one size and return decoded predictions (B, 4 + classes, anchors),
boxes as cx, cy, w, h in the letterboxed input's pixels, first in their output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qz_core import QzError
from qz_detection.detector import Detection
from qz_detection.transforms import boxes_from_letterbox


class YoloPredictions(nn.Module):
    """A YOLO's deployable output: the decoded predictions (B, 4 + classes, anchors) only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


class LetterboxDetector:
    """``detection_inputs`` and ``detect`` (ultralytics' NMS) of a letterboxed YOLO; mixes into an ``nn.Module``.

    Attributes:
        conf_thres, iou_thres, max_det: ``detect``'s NMS settings.
    """

    conf_thres = 0.25
    iou_thres = 0.45
    max_det = 300

    def detection_inputs(self, images: Sequence[Tensor]) -> Tensor:
        """Letterboxed images of one size, stacked.

        Raises:
            QzError: the images differ in size (the transform must letterbox them).
        """
        if len({tuple(x.shape) for x in images}) != 1:
            raise QzError("YOLO takes letterboxed images of one size: use the model's transform (LetterBox).")
        return torch.stack(list(images))

    def predictions(self, images: Tensor | list[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """The decoded predictions of ``images`` and the letterboxed input's (H, W)."""
        x = images if isinstance(images, Tensor) else self.detection_inputs(images)
        out = self(x)  # type: ignore[operator]
        return (out[0] if isinstance(out, (tuple, list)) else out), (int(x.shape[-2]), int(x.shape[-1]))

    def detect(self, images: Tensor | list[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Detection]:
        """ultralytics' NMS on the decoded predictions, boxes taken back through the letterbox."""
        from qz_detection._ultralytics import import_ultralytics

        nms = import_ultralytics("ultralytics.utils.nms").non_max_suppression
        predictions, input_size = self.predictions(images)
        kept = nms(predictions, self.conf_thres, self.iou_thres, max_det=self.max_det)
        return [
            {"boxes": boxes_from_letterbox(k[:, :4], size, input_size), "labels": k[:, 5].long(), "scores": k[:, 4]}
            for k, size in zip(kept, image_sizes, strict=True)
        ]
