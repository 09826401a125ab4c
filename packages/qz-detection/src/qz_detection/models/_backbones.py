"""Detection backbones from qz-classification's quantizable classifiers, cut and frozen as torchvision does."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models.detection.backbone_utils import (
    _mobilenet_extractor,
    _resnet_fpn_extractor,
    _validate_trainable_layers,
)
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from qz_classification.models.mobilenetv3 import mobilenet_v3_large
from qz_classification.models.resnet import resnet50
from qz_core.builder import WeightsArg
from qz_detection.models._common import QuantizableBackboneWithFPN, upgrade


def backbone_norm(weights: WeightsArg, weights_backbone: WeightsArg) -> type[nn.Module]:
    """torchvision's rule: FrozenBatchNorm2d once any weights are given, BatchNorm2d otherwise."""
    return FrozenBatchNorm2d if weights is not None or weights_backbone is not None else nn.BatchNorm2d


def resnet50_fpn(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_layers: int | None,
    progress: bool,
    returned_layers: list[int] | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    fpn_norm_layer: Callable[..., nn.Module] | None = None,
    norm_layer: type[nn.Module] | None = None,
) -> QuantizableBackboneWithFPN:
    """qz's ResNet50 (unfused, ``skip_fuse=True``) under torchvision's FPN, as ``_resnet_fpn_extractor`` builds it.

    Args:
        norm_layer: backbone norm; by default torchvision's rule (``backbone_norm``).
    """
    is_trained = weights is not None or weights_backbone is not None
    layers = _validate_trainable_layers(is_trained, trainable_layers, 5, 3)
    norm = norm_layer or backbone_norm(weights, weights_backbone)
    body = resnet50(weights=weights_backbone, progress=progress, norm_layer=norm, skip_fuse=True)
    backbone = _resnet_fpn_extractor(body, layers, returned_layers, extra_blocks, norm_layer=fpn_norm_layer)
    return upgrade(backbone, QuantizableBackboneWithFPN)


def mobilenet_v3_large_fpn(
    *,
    weights: WeightsArg,
    weights_backbone: WeightsArg,
    trainable_layers: int | None,
    progress: bool,
) -> QuantizableBackboneWithFPN:
    """qz's MobileNetV3-Large (unfused) under torchvision's FPN, as Faster R-CNN MobileNet builds it."""
    is_trained = weights is not None or weights_backbone is not None
    layers = _validate_trainable_layers(is_trained, trainable_layers, 6, 3)
    norm = backbone_norm(weights, weights_backbone)
    body = mobilenet_v3_large(weights=weights_backbone, progress=progress, norm_layer=norm, skip_fuse=True)
    return upgrade(_mobilenet_extractor(body, True, layers), QuantizableBackboneWithFPN)
