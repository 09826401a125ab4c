"""Quantizable LRASPP (Lite R-ASPP) with a dilated MobileNetV3-Large backbone."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.nn import functional as F
from torchvision.models.segmentation.lraspp import LRASPP, LRASPP_MobileNet_V3_Large_Weights, LRASPPHead

from qz_core import ModelSpec, define_model
from qz_core.builder import WeightsArg
from qz_core.fusion import check_fuse_level
from qz_segmentation.models._base import (
    DEPLOYED_RATIO_TARGET,
    INPUT_SIZE,
    TASK,
    TRANSIENT_KWARGS,
    check_num_classes,
    fuse_heads,
    mobilenet_v3_features,
    mobilenet_v3_getter,
    upsample_logits,
    without_aux_head,
)

__all__ = ["QuantizableLRASPP", "QuantizableLRASPPHead", "lraspp_mobilenet_v3_large"]


class QuantizableLRASPPHead(LRASPPHead):
    """LRASPPHead whose attention multiply and final add run through ``FloatFunctional``.

    The sigmoid of the pooled branch runs as INT8 sigmoid (fixed output scale 1/256).
    """

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int) -> None:
        super().__init__(low_channels, high_channels, num_classes, inter_channels)
        self.mul = FloatFunctional()
        self.add = FloatFunctional()

    def forward(self, input: dict[str, Tensor]) -> Tensor:
        low, high = input["low"], input["high"]
        x = self.mul.mul(self.cbr(high), self.scale(high))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.add.add(self.low_classifier(low), self.high_classifier(x))


class QuantizableLRASPP(LRASPP):
    """torchvision's LRASPP between a QuantStub and a DeQuantStub."""

    def __init__(
        self, backbone: nn.Module, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128
    ) -> None:
        super().__init__(backbone, low_channels, high_channels, num_classes, inter_channels)
        self.classifier = QuantizableLRASPPHead(low_channels, high_channels, num_classes, inter_channels)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, input: Tensor) -> dict[str, Tensor]:
        features = self.backbone(self.quant(input))
        result = OrderedDict()
        result["out"] = upsample_logits(self.classifier(features), input.shape[-2:], self.dequant)
        return result

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses the backbone as MobileNetV3 does; with ``level='all'`` the head's conv-bn-ReLU too."""
        if check_fuse_level(level) == "none":
            return
        self.backbone.fuse_model(is_qat, level)
        if level == "all":
            fuse_heads(self, ["classifier"], is_qat)


def _lraspp_mobilenetv3(num_classes: int = 21, weights_backbone: WeightsArg = None) -> QuantizableLRASPP:
    features, stages = mobilenet_v3_features(weights_backbone)
    low_pos, high_pos = stages[-4], stages[-1]  # C2 (output stride 8), C5 (output stride 16)
    backbone = mobilenet_v3_getter(features, {str(low_pos): "low", str(high_pos): "high"})
    return QuantizableLRASPP(
        backbone, features[low_pos].out_channels, features[high_pos].out_channels, check_num_classes(num_classes)
    )


lraspp_mobilenet_v3_large = define_model(
    ModelSpec(
        name="lraspp_mobilenet_v3_large",
        task=TASK,
        family="lraspp",
        make_model=_lraspp_mobilenetv3,
        weights_enum=LRASPP_MobileNet_V3_Large_Weights,
        input_size=INPUT_SIZE,
        adjust_kwargs=without_aux_head,
        transient_kwargs=TRANSIENT_KWARGS,
        deployed_ratio_target=DEPLOYED_RATIO_TARGET,
        description="Lite R-ASPP, dilated MobileNetV3-Large backbone",
    )
)
