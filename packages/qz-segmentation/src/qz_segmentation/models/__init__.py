"""Quantizable segmentation models; importing this module registers them with qz-core."""

from qz_segmentation.models import deeplabv3, fcn, lraspp, mask_rcnn
from qz_segmentation.models.deeplabv3 import *  # noqa: F403
from qz_segmentation.models.fcn import *  # noqa: F403
from qz_segmentation.models.lraspp import *  # noqa: F403
from qz_segmentation.models.mask_rcnn import *  # noqa: F403

__all__ = [*deeplabv3.__all__, *fcn.__all__, *lraspp.__all__, *mask_rcnn.__all__]
