"""How classification families register their builders with qz-core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms._presets import ImageClassification

from qz_core import QzError, build_quantizable, register_model
from qz_core.builder import WeightsArg


def imagenet_transforms(crop_size: int = 224, resize_size: int = 256) -> ImageClassification:
    """ImageNet preprocessing (resize, center crop, normalize) for weights without their own."""
    return ImageClassification(crop_size=crop_size, resize_size=resize_size)


# Deployed INT8/FP32 latency ratio (batch 1, the faster of eager INT8 and onnxruntime on qz's INT8
# export, over eager FP32) each family must reach in ``qz bench``. Families without one (GoogLeNet,
# Inception) must at least run faster in INT8 (qz_core's default, 1.0).
DEPLOYED_RATIO_TARGETS = {
    "resnet": 0.18,
    "vgg": 0.18,
    "mobilenet": 0.3,
    "mnasnet": 0.3,
    "squeezenet": 0.3,
    "shufflenet": 0.3,
    "regnet": 0.3,
    "densenet": 0.3,
    "efficientnet": 0.5,
    "convnext": 0.5,
}


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
        **({"deployed_ratio_target": DEPLOYED_RATIO_TARGETS[family]} if family in DEPLOYED_RATIO_TARGETS else {}),
        default_transforms=lambda: imagenet_transforms(input_size[0], int(input_size[0] * 256 / 224)),
        qat_loss=nn.CrossEntropyLoss,
        **meta,
    )


_BUILDER_DOC = """Quantizable {name} (torchvision architecture, weights ``{weights}``).

Args:
    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.
    progress: show a download progress bar.
    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
    is_qat: prepare for quantization-aware training.
    skip_fuse: leave fusion to the caller.
    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``{architecture}`` arguments.
"""


def define_classifier(
    name: str,
    weights_enum: type[WeightsEnum],
    family: str,
    make_model: Callable[..., nn.Module],
    *,
    architecture: str,
    fixed: dict[str, Any] | None = None,
) -> Callable[..., nn.Module]:
    """Defines and registers the public builder ``name`` with the seed signature.

    Args:
        make_model: builds the unfused quantizable model from the remaining keyword arguments.
        architecture: the torchvision class whose arguments ``**kwargs`` takes (for the docstring).
        fixed: arguments this variant sets (ResNeXt's ``groups``); a different value is an error.
    """
    fixed = dict(fixed or {})

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        for key, value in fixed.items():
            if kwargs.setdefault(key, value) != value:
                raise QzError(f"{name} has {key}={value}; got {key}={kwargs[key]}.")
        return build_quantizable(
            make_model,
            weights=weights,
            weights_enum=weights_enum,
            progress=progress,
            quantize=quantize,
            is_qat=is_qat,
            skip_fuse=skip_fuse,
            **kwargs,
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _BUILDER_DOC.format(name=name, weights=weights_enum.__name__, architecture=architecture)
    return register_classifier(name, weights_enum, family=family)(builder)
