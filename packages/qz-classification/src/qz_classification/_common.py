"""What every classifier spec shares: ImageNet preprocessing and the latency targets of ``qz bench``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torchvision.transforms._presets import ImageClassification

TASK = "classification"

# Deployed INT8/FP32 latency ratio (batch 1, the fastest INT8 runtime: eager, onnxruntime or OpenVINO on qz's INT8
# export, over eager FP32) each family must reach in ``qz bench``. Families without one (GoogLeNet,
# Inception) must at least run faster in INT8 (qz_core's default, 1.0).
DEPLOYED_RATIO_TARGETS = {
    "resnet": 0.15,
    "vgg": 0.15,
    "mobilenet": 0.25,
    "mnasnet": 0.25,
    "squeezenet": 0.25,
    "shufflenet": 0.25,
    "regnet": 0.25,
    "densenet": 0.3,
    "efficientnet": 0.5,
    "convnext": 0.5,
}


def ratio_target(family: str) -> float:
    """The deployed INT8/FP32 latency ratio ``qz bench`` asks of ``family`` (1.0 without a target)."""
    return DEPLOYED_RATIO_TARGETS.get(family, 1.0)


def imagenet_transform(crop_size: int = 224, resize_size: int | None = None) -> ImageClassification:
    """ImageNet preprocessing (resize, center crop, normalize); resize to ``crop_size * 256 / 224`` by default."""
    return ImageClassification(crop_size=crop_size, resize_size=resize_size or int(crop_size * 256 / 224))


def imagenet_preprocess(input_size: tuple[int, int]) -> Callable[[], ImageClassification]:
    """A spec's ``preprocess``: ImageNet preprocessing at the model's input size."""
    return partial(imagenet_transform, input_size[0])
