"""qz-segmentation: INT8 quantizable segmentation models (registered through the qz.models entry point)."""

from qz_segmentation import models  # noqa: F401

__version__ = "0.1.0"
