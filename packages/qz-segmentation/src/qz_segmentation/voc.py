"""Pascal VOC segmentation folders: JPEGImages/, SegmentationClass/ PNG masks, ImageSets/Segmentation/*.txt."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from qz_core import QzError
from qz_core.errors import invalid_choice

IMAGES, MASKS, SPLITS = "JPEGImages", "SegmentationClass", Path("ImageSets", "Segmentation")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_voc_root(path: str | os.PathLike) -> Path:
    """The folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/.

    Accepts that folder itself, or a parent holding ``VOC2012`` or ``VOCdevkit/VOC2012``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise QzError(f"The VOC folder {str(root)!r} does not exist (or is not a folder).")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if all((candidate / part).is_dir() for part in (IMAGES, MASKS, SPLITS)):
            return candidate
    missing = [str(part) for part in (IMAGES, MASKS, SPLITS) if not (root / part).is_dir()]
    raise QzError(
        f"{str(root)!r} is not a Pascal VOC segmentation folder: it lacks {', '.join(missing)} "
        "(expected JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt, here or in VOC2012/)."
    )


def voc_splits(root: Path) -> list[str]:
    """The split names listed in ImageSets/Segmentation (``train``, ``val``, ``trainval``, ...)."""
    return sorted(p.stem for p in (root / SPLITS).glob("*.txt"))


def read_mask(path: Path) -> Tensor:
    """A VOC mask as class indices ``(H, W)`` (int64; palette PNGs store indices, 255 = ignore)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise QzError(
                f"Mask {str(path)!r} is a {image.mode} image: expected a palette or grayscale PNG of indices."
            )
        return torch.from_numpy(np.array(image, dtype=np.int64))


class VOCSegmentationFolder(Dataset):
    """(image, mask) pairs of one split of a VOC-layout folder.

    The image goes through ``transform`` (e.g. the weights' ``SemanticSegmentation``); the mask is
    resized to the transformed image's size with nearest-neighbour interpolation, so metrics are
    counted at the resolution the model sees (as torchvision's reference evaluation does).
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable[[Image.Image], Any]) -> None:
        self.root = find_voc_root(root)
        splits = voc_splits(self.root)
        if split not in splits:
            raise invalid_choice("split", split, splits, hint=f"Splits are the .txt files in {self.root / SPLITS}.")
        self.split = split
        ids = [line.strip() for line in (self.root / SPLITS / f"{split}.txt").read_text().splitlines()]
        self.ids = [i for i in ids if i]
        if not self.ids:
            raise QzError(f"Split {split!r} of {str(self.root)!r} lists no images.")
        self.images = [self._image_path(i) for i in self.ids]
        self.masks = [self.root / MASKS / f"{i}.png" for i in self.ids]
        absent = [str(p.relative_to(self.root)) for p in self.images + self.masks if not p.is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (f", ... ({len(absent)} in all)" if len(absent) > 5 else "")
            raise QzError(f"Split {split!r} of {str(self.root)!r} lists files that do not exist: {shown}.")
        self.transform = transform

    def _image_path(self, image_id: str) -> Path:
        for suffix in _IMAGE_SUFFIXES:
            path = self.root / IMAGES / f"{image_id}{suffix}"
            if path.is_file():
                return path
        return self.root / IMAGES / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        with Image.open(self.images[index]) as image:
            tensor = self.transform(image.convert("RGB"))
        mask = read_mask(self.masks[index])
        if tuple(mask.shape) != tuple(tensor.shape[-2:]):
            mask = resize(mask[None], list(tensor.shape[-2:]), interpolation=InterpolationMode.NEAREST)[0]
        return tensor, mask
