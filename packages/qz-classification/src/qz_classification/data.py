"""Image folders for classification: a flat folder of images, or one subfolder per class (ImageFolder).

qz-core's ``image_dataset`` reads both, skipping hidden files and folders (``.ipynb_checkpoints``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from qz_core import image_dataset

Transform = Callable[[Image.Image], Any]
LAYOUT = "DIR/CLASS/IMAGE.jpg (ImageFolder layout)"


def calibration_images(path: str | os.PathLike, transform: Transform | None = None) -> Dataset:
    """Calibration images: a flat folder of images, or one subfolder per class.

    Raises:
        QzError: the folder is missing or holds no images.
    """
    return image_dataset(path, transform, purpose="calibration")


def training_images(
    path: str | os.PathLike, transform: Transform | None = None, *, purpose: str = "training"
) -> Dataset:
    """Labelled images: one subfolder per class (ImageFolder layout).

    Raises:
        QzError: the folder is missing, has no class folders, or a class folder holds no images.
    """
    return image_dataset(path, transform, purpose=purpose, labeled=True)
