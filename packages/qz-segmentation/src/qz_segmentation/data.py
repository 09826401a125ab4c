"""Segmentation data folders: images for calibration, (image, mask) pairs for QAT and evaluation, batching."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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
from qz_core.data import IMAGE_EXTENSIONS, image_files, read_rgb
from qz_segmentation.losses import IGNORE_INDEX

Transform = Callable[[Image.Image], Any]
# The image/mask folder pair layout: images/x.jpg beside masks/x.png.
PAIR_IMAGES, PAIR_MASKS = "images", "masks"


def read_mask(path: Path) -> Tensor:
    """A mask as class indices ``(H, W)`` (int64; palette PNGs store indices, 255 = ignore)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise QzError(
                    f"Mask {str(path)!r} is a {image.mode} image: expected a palette or grayscale PNG of indices."
                )
            return torch.from_numpy(np.array(image, dtype=np.int64))
    except (OSError, SyntaxError, ValueError) as exc:
        raise QzError(f"Cannot read mask {str(path)!r}: {exc}") from None


class ImageList(Dataset):
    """Unlabelled images (RGB) through ``transform``: calibration samples."""

    def __init__(self, files: Sequence[Path], transform: Transform) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        return self.transform(read_rgb(self.files[index]))


class ImageMaskPairs(Dataset):
    """(image, mask) pairs, transformed jointly.

    The image goes through ``transform`` (a resizing transform such as the weights'
    ``SemanticSegmentation``); the mask is resized to the transformed image's size with
    nearest-neighbour interpolation, so it labels the pixels the model sees (as torchvision's
    reference evaluation does). An image and its mask must have the same size.
    """

    def __init__(self, images: Sequence[Path], masks: Sequence[Path], transform: Transform) -> None:
        self.images = list(images)
        self.masks = list(masks)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        mask = read_mask(self.masks[index])
        image = read_rgb(self.images[index])
        if (image.height, image.width) != tuple(mask.shape):
            raise QzError(
                f"Mask {str(self.masks[index])!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{str(self.images[index])!r} is {image.width}x{image.height}: they must have the same size."
            )
        tensor = self.transform(image)
        if tuple(mask.shape) != tuple(tensor.shape[-2:]):
            mask = resize(mask[None], list(tensor.shape[-2:]), interpolation=InterpolationMode.NEAREST)[0]
        return tensor, mask


def is_pair_folder(root: Path) -> bool:
    """``root`` holds images/ and masks/ folders."""
    return (root / PAIR_IMAGES).is_dir() and (root / PAIR_MASKS).is_dir()


def image_mask_folder(root: str | os.PathLike, transform: Transform) -> ImageMaskPairs:
    """The pairs ``images/x.jpg`` + ``masks/x.png`` (same stem) of ``root``.

    Raises:
        QzError: no images, or images without a mask.
    """
    root = Path(root).expanduser()
    images = image_files(root / PAIR_IMAGES)
    if not images:
        raise QzError(f"{str(root / PAIR_IMAGES)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    masks = [root / PAIR_MASKS / f"{p.stem}.png" for p in images]
    absent = [str(m.relative_to(root)) for m in masks if not m.is_file()]
    if absent:
        shown = ", ".join(absent[:5]) + (f", ... ({len(absent)} in all)" if len(absent) > 5 else "")
        raise QzError(f"Images of {str(root)!r} have no mask: {shown} do not exist (a mask has its image's stem).")
    return ImageMaskPairs(images, masks, transform)


def _pad_stack(tensors: Sequence[Tensor], fill: float) -> Tensor:
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    batch = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), fill)
    for padded, tensor in zip(batch, tensors, strict=True):
        padded[..., : tensor.shape[-2], : tensor.shape[-1]].copy_(tensor)
    return batch


def pad_collate(samples: Sequence[Any]) -> Tensor | tuple[Tensor, Tensor]:
    """Batches images (or (image, mask) pairs) of different sizes by padding them to the largest.

    Padding goes to the bottom and right: images with 0 (the mean colour, after normalization),
    masks with 255 (ignored by the loss and the metrics).
    """
    if isinstance(samples[0], Tensor):
        return _pad_stack(samples, 0.0)
    images, masks = zip(*samples, strict=True)
    return _pad_stack(images, 0.0), _pad_stack(masks, IGNORE_INDEX)
