"""Image folders for calibration, QAT and evaluation data, read as the user sees them.

Hidden files and folders (``.ipynb_checkpoints``) are skipped, 16-bit images are scaled rather than
clipped, and an unreadable file is named in one clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from qz_core.errors import QzError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def is_hidden(path: Path) -> bool:
    """True for dot files and dot folders (editor and notebook leftovers)."""
    return path.name.startswith(".")


def image_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and subfolders with ``recursive``), sorted; hidden parts skipped."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Reads an image as 8-bit RGB; 16-bit and float images are scaled to 0..255, not clipped.

    Raises:
        QzError: the file is missing, not an image, or damaged.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise QzError(f"Cannot read image {os.fspath(path)!r}: {exc}") from None


class FlatImageFolder(Dataset):
    """Images directly inside one folder, without labels (target -1): enough for calibration."""

    def __init__(self, root: Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.files = image_files(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = read_rgb(self.files[index])
        return (self.transform(image) if self.transform else image), -1


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden class folders and files, reading images with ``read_rgb``."""

    def __init__(self, root: str, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self._root_path = Path(root)
        super().__init__(root, transform=transform, loader=read_rgb, is_valid_file=self._visible_image)

    def _visible_image(self, path: str) -> bool:
        file = Path(path)
        parts = file.relative_to(self._root_path).parts
        return file.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in parts)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def check_dir(path: str | os.PathLike, purpose: str) -> Path:
    """``path`` as an existing folder, else a clear error naming the purpose."""
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
    root = check_dir(path, purpose)
    has_classes = any(p.is_dir() and not is_hidden(p) for p in root.iterdir())
    if has_classes:
        try:
            return VisibleImageFolder(os.fspath(root), transform=transform)
        except FileNotFoundError as exc:
            raise QzError(f"The {purpose} folder {str(root)!r}: {exc}") from None
    if labeled:
        raise QzError(
            f"The {purpose} folder {str(root)!r} has no class folders: labels come from DIR/CLASS/IMAGE.jpg "
            "(ImageFolder layout)."
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
