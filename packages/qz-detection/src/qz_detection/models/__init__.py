"""Quantizable detection models; importing this module registers them with qz-core.

torchvision's RetinaNet, FCOS, SSD, SSDLite and Faster R-CNN, and ultralytics' YOLOv3/v5.
"""

from qz_detection.models import yolo  # noqa: F401
from qz_detection.models.faster_rcnn import *  # noqa: F403
from qz_detection.models.fcos import *  # noqa: F403
from qz_detection.models.retinanet import *  # noqa: F403
from qz_detection.models.ssd import *  # noqa: F403
from qz_detection.models.ssdlite import *  # noqa: F403
