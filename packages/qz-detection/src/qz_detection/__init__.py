"""qz-detection: INT8 quantizable detection models (registered through the qz.models entry point)."""

from qz_detection import models  # noqa: F401

__version__ = "0.1.0"
