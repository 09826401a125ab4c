"""Quantizable detection models; importing this module registers them with qz-core.

No detection family is registered yet: they arrive in their own issues.
"""
from qz_detection.models.retinanet import *  # noqa: F403
from qz_detection.models.fcos import *  # noqa: F403
from qz_detection.models import yolo  # noqa: F401
from qz_detection.models.ssd import *  # noqa: F403
from qz_detection.models.ssdlite import *  # noqa: F403
from qz_detection.models.faster_rcnn import *  # noqa: F403
