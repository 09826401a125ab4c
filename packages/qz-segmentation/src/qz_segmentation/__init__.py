"""qz-segmentation: INT8 quantizable FCN, DeepLabV3 and LRASPP (registered through the qz.models entry point)."""

from qz_segmentation import models as models
from qz_segmentation._registry import SegmentationLoss as SegmentationLoss
from qz_segmentation.models import *  # noqa: F401,F403

__version__ = "0.1.0"
