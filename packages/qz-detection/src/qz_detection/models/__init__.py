"""Quantizable detection models; importing this module registers them with qz-core.

torchvision's RetinaNet, FCOS, SSD, SSDLite and Faster R-CNN, and ultralytics' YOLOv3/v5. ultralytics
is imported on the first YOLO build; ``QuantizableYOLO`` is resolved on first access (PEP 562).
"""

from typing import Any

from qz_detection.models import yolo
from qz_detection.models.faster_rcnn import *  # noqa: F403
from qz_detection.models.fcos import *  # noqa: F403
from qz_detection.models.retinanet import *  # noqa: F403
from qz_detection.models.ssd import *  # noqa: F403
from qz_detection.models.ssdlite import *  # noqa: F403
from qz_detection.models.yolo import (  # noqa: F401
    read_yolo_checkpoint,
    yolov3,
    yolov3_spp,
    yolov3_tiny,
    yolov5l,
    yolov5m,
    yolov5n,
    yolov5s,
    yolov5x,
)


def __getattr__(name: str) -> Any:
    """``QuantizableYOLO`` and the other ultralytics-dependent names, imported on first use."""
    return getattr(yolo, name)
