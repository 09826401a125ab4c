"""Pascal VOC segmentation folders: JPEGImages/, SegmentationClass/ PNG masks, ImageSets/Segmentation/*.txt."""

from __future__ import annotations

import os
from pathlib import Path

from qz_core import QzError
from qz_core.errors import invalid_choice
from qz_segmentation.data import ImageMaskPairs, Transform, read_mask

__all__ = ["VOCSegmentationFolder", "find_voc_root", "read_mask", "voc_root", "voc_splits"]

IMAGES, MASKS, SPLITS = "JPEGImages", "SegmentationClass", Path("ImageSets", "Segmentation")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def voc_root(path: str | os.PathLike) -> Path | None:
    """The VOC folder at or under ``path`` (itself, ``VOC2012/`` or ``VOCdevkit/VOC2012/``), or None."""
    root = Path(path).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if all((candidate / part).is_dir() for part in (IMAGES, MASKS, SPLITS)):
            return candidate
    return None


def find_voc_root(path: str | os.PathLike) -> Path:
    """The folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/.

    Accepts that folder itself, or a parent holding ``VOC2012`` or ``VOCdevkit/VOC2012``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise QzError(f"The VOC folder {str(root)!r} does not exist (or is not a folder).")
    found = voc_root(root)
    if found is not None:
        return found
    missing = [str(part) for part in (IMAGES, MASKS, SPLITS) if not (root / part).is_dir()]
    raise QzError(
        f"{str(root)!r} is not a Pascal VOC segmentation folder: it lacks {', '.join(missing)} "
        "(expected JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt, here or in VOC2012/)."
    )


def voc_splits(root: Path) -> list[str]:
    """The split names listed in ImageSets/Segmentation (``train``, ``val``, ``trainval``, ...)."""
    return sorted(p.stem for p in (root / SPLITS).glob("*.txt"))


class VOCSegmentationFolder(ImageMaskPairs):
    """(image, mask) pairs of one split of a VOC-layout folder, transformed as ``ImageMaskPairs`` does.

    Metrics are counted at the resolution the model sees (as torchvision's reference evaluation does).
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Transform) -> None:
        self.root = find_voc_root(root)
        splits = voc_splits(self.root)
        if split not in splits:
            raise invalid_choice("split", split, splits, hint=f"Splits are the .txt files in {self.root / SPLITS}.")
        self.split = split
        ids = [line.strip() for line in (self.root / SPLITS / f"{split}.txt").read_text().splitlines()]
        self.ids = [i for i in ids if i]
        if not self.ids:
            raise QzError(f"Split {split!r} of {str(self.root)!r} lists no images.")
        images = [self._image_path(i) for i in self.ids]
        masks = [self.root / MASKS / f"{i}.png" for i in self.ids]
        absent = [str(p.relative_to(self.root)) for p in images + masks if not p.is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (f", ... ({len(absent)} in all)" if len(absent) > 5 else "")
            raise QzError(f"Split {split!r} of {str(self.root)!r} lists files that do not exist: {shown}.")
        super().__init__(images, masks, transform)

    def _image_path(self, image_id: str) -> Path:
        for suffix in _IMAGE_SUFFIXES:
            path = self.root / IMAGES / f"{image_id}{suffix}"
            if path.is_file():
                return path
        return self.root / IMAGES / f"{image_id}.jpg"
