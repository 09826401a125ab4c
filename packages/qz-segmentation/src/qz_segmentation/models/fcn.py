"""Quantizable FCN with a dilated ResNet-50/101 backbone."""

from __future__ import annotations

from typing import Any

from torchvision.models.segmentation.fcn import FCN, FCN_ResNet50_Weights, FCN_ResNet101_Weights, FCNHead

from qz_core.builder import WeightsArg
from qz_segmentation._registry import check_num_classes, define_segmenter
from qz_segmentation.models._base import QuantizableSegmentationModel, resnet_backbone

__all__ = ["QuantizableFCN", "fcn_resnet50", "fcn_resnet101"]


class QuantizableFCN(QuantizableSegmentationModel, FCN):
    """torchvision's FCN between a QuantStub and a DeQuantStub.

    FCNHead (conv-bn-ReLU, dropout, conv) needs no change: its conv-bn-ReLU fuses, dropout is an
    identity in eval, and every op runs in INT8.
    """


def _fcn_resnet(
    arch: str, num_classes: int = 21, aux_loss: bool | None = None, weights_backbone: WeightsArg = None
) -> QuantizableFCN:
    return_layers = {"layer4": "out"} | ({"layer3": "aux"} if aux_loss else {})
    backbone = resnet_backbone(arch, weights_backbone, return_layers)
    classifier = FCNHead(2048, check_num_classes(num_classes))
    return QuantizableFCN(backbone, classifier, FCNHead(1024, num_classes) if aux_loss else None)


def _make(arch: str) -> Any:
    return lambda **kwargs: _fcn_resnet(arch, **kwargs)


fcn_resnet50 = define_segmenter("fcn_resnet50", FCN_ResNet50_Weights, "fcn", _make("resnet50"))
fcn_resnet101 = define_segmenter("fcn_resnet101", FCN_ResNet101_Weights, "fcn", _make("resnet101"))
