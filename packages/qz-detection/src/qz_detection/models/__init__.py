"""Quantizable detection models; importing this module registers them with qz-core.

torchvision's RetinaNet, FCOS, SSD, SSDLite and Faster R-CNN, and ultralytics' YOLOv3u/v5u/v8/11. ultralytics
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
    yolo11l,
    yolo11m,
    yolo11n,
    yolo11s,
    yolo11x,
    yolov3_sppu,
    yolov3_tinyu,
    yolov3u,
    yolov5lu,
    yolov5mu,
    yolov5nu,
    yolov5su,
    yolov5xu,
    yolov8l,
    yolov8m,
    yolov8n,
    yolov8s,
    yolov8x,
)
from qz_detection.models.yolov4 import QuantizableYOLOv4, yolov4, yolov4_tiny  # noqa: F401
from qz_detection.models.yolov5 import yolov5l, yolov5m, yolov5n, yolov5s, yolov5x  # noqa: F401


def __getattr__(name: str) -> Any:
    """``QuantizableYOLO`` and the other ultralytics-dependent names, imported on first use."""
    return getattr(yolo, name)
