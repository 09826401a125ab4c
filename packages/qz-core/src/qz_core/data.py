"""Image folders for calibration, QAT and evaluation data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from qz_core.errors import QzError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class FlatImageFolder(Dataset):
    """Images directly inside one folder, without labels (target -1): enough for calibration."""

    def __init__(self, root: Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.open(self.files[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), -1


def _check_dir(path: str | os.PathLike, purpose: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise QzError(f"The {purpose} folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise QzError(f"The {purpose} folder {str(root)!r} is not a folder.")
    return root


def image_dataset(
    path: str | os.PathLike,
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    purpose: str = "data",
    labeled: bool = False,
) -> Dataset:
    """An image dataset: class subfolders (ImageFolder layout) or, unless ``labeled``, a flat folder.

    Raises:
        QzError: the folder is missing or holds no images.
    """
    root = _check_dir(path, purpose)
    has_classes = any(p.is_dir() for p in root.iterdir())
    if has_classes:
        try:
            return ImageFolder(os.fspath(root), transform=transform)
        except FileNotFoundError as exc:
            raise QzError(f"The {purpose} folder {str(root)!r}: {exc}") from None
    if labeled:
        raise QzError(
            f"The {purpose} folder {str(root)!r} needs one subfolder per class (ImageFolder layout) for labels."
        )
    dataset = FlatImageFolder(root, transform)
    if len(dataset) == 0:
        raise QzError(f"The {purpose} folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return dataset


def image_loader(
    path: str | os.PathLike,
    transform: Callable[[Image.Image], Any],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    shuffle: bool = False,
    purpose: str = "data",
    labeled: bool = False,
) -> DataLoader:
    """A DataLoader over ``image_dataset(path, transform)``."""
    dataset = image_dataset(path, transform, purpose=purpose, labeled=labeled)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle)
