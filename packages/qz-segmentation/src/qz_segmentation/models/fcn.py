"""Quantizable FCN with a dilated ResNet-50/101 backbone."""

from __future__ import annotations

from functools import partial

from torchvision.models.segmentation.fcn import FCN, FCN_ResNet50_Weights, FCN_ResNet101_Weights, FCNHead

from qz_core import ModelSpec, define_model
from qz_core.builder import WeightsArg
from qz_segmentation.models._base import (
    DEPLOYED_RATIO_TARGET,
    INPUT_SIZE,
    TASK,
    TRANSIENT_KWARGS,
    QuantizableSegmentationModel,
    check_num_classes,
    resnet_backbone,
    with_aux_head,
)

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


_FCN = ModelSpec(
    name="fcn_resnet50",
    task=TASK,
    family="fcn",
    make_model=partial(_fcn_resnet, "resnet50"),
    weights_enum=FCN_ResNet50_Weights,
    input_size=INPUT_SIZE,
    adjust_kwargs=with_aux_head,
    transient_kwargs=TRANSIENT_KWARGS,
    deployed_ratio_target=DEPLOYED_RATIO_TARGET,
    description="FCN, dilated ResNet-50 backbone",
)

fcn_resnet50 = define_model(_FCN)
fcn_resnet101 = define_model(
    _FCN.variant(
        name="fcn_resnet101",
        make_model=partial(_fcn_resnet, "resnet101"),
        weights_enum=FCN_ResNet101_Weights,
        description="FCN, dilated ResNet-101 backbone",
    )
)
