"""What every quantizable detector class says of itself, so the detection task never asks which family it is.

torchvision detectors take a list of CHW images of any size and return loss dicts in training;
YOLO takes letterboxed images of one size and trains on ultralytics' loss. Each quantizable class
implements ``QuantizableDetector`` and ``qz_detection.task.DetectionTask`` dispatches to it.

Targets and predictions are in the original image's pixels: ``boxes`` (N, 4) xyxy, ``labels`` (N,)
contiguous class indices from 0, ``category_ids`` (N,) (the COCO category id; YOLO txt class k is
category k + 1) and ``image_size`` (H, W) of the original image. Each model maps them to its own input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from qz_core import QzError, recipe_of

Target = dict[str, Any]
Detection = dict[str, Tensor]


@dataclass
class DetectionBatch:
    """A batch of images (stacked when they share a size, else a list) and their targets (None to calibrate)."""

    images: Tensor | list[Tensor]
    targets: list[Target] | None = None

    @property
    def image_list(self) -> list[Tensor]:
        """The images as a list of CHW tensors."""
        return list(self.images)


def stack_or_list(images: Sequence[Tensor]) -> Tensor | list[Tensor]:
    """Stacks images of one size (every detector takes a batch tensor); keeps a list for mixed sizes."""
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(list(images))
    return list(images)


@runtime_checkable
class QuantizableDetector(Protocol):
    """The methods the detection task calls on a model (float, prepared or INT8)."""

    def detection_inputs(self, images: Sequence[Tensor]) -> Tensor | list[Tensor]:
        """What the model is called with for these transformed images."""

    def detection_loss(self, images: Tensor | list[Tensor], targets: Sequence[Target]) -> Tensor:
        """The training loss of one batch (model in training mode); targets in original pixels."""

    def detect(self, images: Tensor | list[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Detection]:
        """``boxes`` (xyxy, original pixels), ``labels`` and ``scores`` per image (model in eval mode)."""

    def export_module(self) -> nn.Module:
        """The deployable network that goes to ONNX and is compared FP32 vs INT8."""

    def settle_random_weights(self, inputs: Sequence[Any]) -> None:
        """Makes random-weight activations realistic for probes and benchmarks."""


def as_detector(model: nn.Module) -> QuantizableDetector:
    """``model`` as a ``QuantizableDetector``; a model without those methods is an error naming them."""
    if not isinstance(model, QuantizableDetector):
        raise QzError(
            f"{type(model).__name__} is not a qz detector: it lacks detection_inputs, detection_loss, detect, "
            "export_module or settle_random_weights (see qz_detection.detector.QuantizableDetector)."
        )
    return model


def num_classes_of(model: nn.Module, default: int = 91) -> int:
    """The number of classes a qz detector was built with (torchvision's 91 with background by default)."""
    try:
        value = recipe_of(model).model_kwargs.get("num_classes")
    except QzError:
        value = None
    return int(value or default)


def random_targets(images: Tensor, num_classes: int = 2, boxes_per_image: int = 2, seed: int = 0) -> list[Target]:
    """Valid random boxes (pixels of ``images``), labels from 0 and category ids from 1, for QAT on random data."""
    generator = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    size = torch.tensor([w, h], dtype=torch.float32)
    targets = []
    for _ in range(len(images)):
        xy = torch.rand(boxes_per_image, 2, generator=generator) * size / 2
        wh = (0.2 + 0.3 * torch.rand(boxes_per_image, 2, generator=generator)) * size
        labels = torch.randint(0, max(num_classes - 1, 1), (boxes_per_image,), generator=generator)
        targets.append(
            {
                "boxes": torch.cat([xy, torch.minimum(xy + wh, size)], 1),
                "labels": labels,
                "category_ids": labels + 1,
                "image_size": (int(h), int(w)),
            }
        )
    return targets


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """xyxy ``boxes`` of an (H, W) image mapped onto the same image resized to ``to_size``."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
