"""YOLO's letterbox as a torchvision-style transform, and the geometry to map boxes through it and back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

LETTERBOX_FILL = 114 / 255  # ultralytics' grey padding


def letterbox_geometry(
    image_size: tuple[int, int], input_size: tuple[int, int]
) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """How an (H, W) image sits in a letterboxed (H', W') input: scale, resized (h, w), (left, top) padding."""
    height, width = image_size
    ratio = min(input_size[0] / height, input_size[1] / width)
    new_h, new_w = max(round(height * ratio), 1), max(round(width * ratio), 1)
    return ratio, (new_h, new_w), ((input_size[1] - new_w) // 2, (input_size[0] - new_h) // 2)


def boxes_to_letterbox(boxes: Tensor, image_size: tuple[int, int], input_size: tuple[int, int]) -> Tensor:
    """xyxy boxes in the original image's pixels -> pixels of its letterboxed input."""
    _, (new_h, new_w), (left, top) = letterbox_geometry(image_size, input_size)
    scale = torch.tensor([new_w / image_size[1], new_h / image_size[0]] * 2, dtype=boxes.dtype)
    return boxes * scale + torch.tensor([left, top, left, top], dtype=boxes.dtype)


def boxes_from_letterbox(boxes: Tensor, image_size: tuple[int, int], input_size: tuple[int, int]) -> Tensor:
    """xyxy boxes in a letterboxed input's pixels -> the original (H, W) image's pixels, clipped to it."""
    _, (new_h, new_w), (left, top) = letterbox_geometry(image_size, input_size)
    scale = torch.tensor([new_w / image_size[1], new_h / image_size[0]] * 2, dtype=boxes.dtype)
    out = (boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)) / scale
    out[:, 0::2] = out[:, 0::2].clamp(0, image_size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, image_size[0])
    return out


class LetterBox(torch.nn.Module):
    """PIL image or CHW tensor -> float (3, size, size) in [0, 1]: long side resized to ``size``, grey padding.

    The equivalent of ultralytics' ``LetterBox(new_shape=(size, size), auto=False)``, centered.
    """

    def __init__(self, size: int = 640) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: Image.Image | Tensor) -> Tensor:
        x = pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image
        x = x.float().div(255) if not x.is_floating_point() else x
        ratio, (new_h, new_w), (left, top) = letterbox_geometry(tuple(x.shape[-2:]), (self.size, self.size))
        batch = x[None]
        if (new_h, new_w) != tuple(x.shape[-2:]):
            batch = F.interpolate(batch, (new_h, new_w), mode="bilinear", align_corners=False, antialias=ratio < 1)
        padding = (left, self.size - new_w - left, top, self.size - new_h - top)
        return F.pad(batch, padding, value=LETTERBOX_FILL)[0].clamp(0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
