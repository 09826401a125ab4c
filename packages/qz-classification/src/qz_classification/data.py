"""Image folders for classification: a flat folder of images, or one subfolder per class (ImageFolder).

Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from qz_core import QzError
from qz_core.data import IMAGE_EXTENSIONS

Transform = Callable[[Image.Image], Any]
LAYOUT = "DIR/CLASS/IMAGE.jpg (ImageFolder layout)"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))


class FlatImages(Dataset):
    """The images directly inside one folder, unlabelled (target -1)."""

    def __init__(self, root: Path, transform: Transform | None = None) -> None:
        self.root = root
        self.files = sorted(p for p in root.iterdir() if _is_image(p))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        with Image.open(self.files[index]) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform else rgb), -1


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder without hidden class folders and hidden files."""

    def __init__(self, root: Path, transform: Transform | None = None) -> None:
        self._root_path = root
        super().__init__(os.fspath(root), transform=transform, is_valid_file=self._valid)

    def _valid(self, path: str) -> bool:
        relative = Path(path).relative_to(self._root_path)
        return all(_visible(Path(part)) for part in relative.parts) and Path(path).suffix.lower() in IMAGE_EXTENSIONS

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = [p.name for p in _class_folders(Path(directory))]
        return classes, {name: i for i, name in enumerate(classes)}


def _folder(path: str | os.PathLike, purpose: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise QzError(f"The {purpose} folder {str(root)!r} {state}.")
    return root


def _class_dataset(root: Path, transform: Transform | None, purpose: str) -> ClassFolders:
    try:
        return ClassFolders(root, transform)
    except FileNotFoundError as exc:
        raise QzError(f"The {purpose} folder {str(root)!r}: {exc}") from None


def calibration_images(path: str | os.PathLike, transform: Transform | None = None) -> Dataset:
    """Calibration images: a flat folder of images, or one subfolder per class.

    Raises:
        QzError: the folder is missing or holds no images.
    """
    root = _folder(path, "calibration")
    if _class_folders(root):
        return _class_dataset(root, transform, "calibration")
    dataset = FlatImages(root, transform)
    if len(dataset) == 0:
        raise QzError(
            f"The calibration folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
            f"directly or in class subfolders."
        )
    return dataset


def training_images(
    path: str | os.PathLike, transform: Transform | None = None, *, purpose: str = "training"
) -> ClassFolders:
    """Labelled images: one subfolder per class (ImageFolder layout).

    Raises:
        QzError: the folder is missing, has no class folders, or a class folder holds no images.
    """
    root = _folder(path, purpose)
    if not _class_folders(root):
        raise QzError(f"The {purpose} folder {str(root)!r} has no class folders: labels come from {LAYOUT}.")
    return _class_dataset(root, transform, purpose)
