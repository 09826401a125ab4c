"""How classification families register their builders with qz-core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms._presets import ImageClassification

from qz_core import register_model


def imagenet_transforms(crop_size: int = 224, resize_size: int = 256) -> ImageClassification:
    """ImageNet preprocessing (resize, center crop, normalize) for weights without their own."""
    return ImageClassification(crop_size=crop_size, resize_size=resize_size)


def register_classifier(
    name: str, weights: type[WeightsEnum] | None, family: str, input_size: tuple[int, int] = (224, 224), **meta: Any
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``register_model`` with what every classifier shares: ImageNet preprocessing, cross-entropy QAT."""
    return register_model(
        name,
        task="classification",
        weights=weights,
        input_size=input_size,
        family=family,
        default_transforms=lambda: imagenet_transforms(input_size[0], int(input_size[0] * 256 / 224)),
        qat_loss=nn.CrossEntropyLoss,
        **meta,
    )
