"""qz-segmentation: INT8 quantizable FCN, DeepLabV3 and LRASPP, and the ``segmentation`` task.

The models load on first use (``qz_segmentation.lraspp_mobilenet_v3_large``): defining them registers
them with qz-core, which asks for this package's task, so importing the task must not import them.
"""

from __future__ import annotations

import importlib
from typing import Any

from qz_segmentation.losses import SegmentationLoss as SegmentationLoss

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    models = importlib.import_module("qz_segmentation.models")
    if name == "models":
        return models
    if name in models.__all__:
        return getattr(models, name)
    raise AttributeError(f"module 'qz_segmentation' has no attribute {name!r}")
