"""Quantizable MobileNetV2."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNet_V2_Weights, MobileNetV2

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, define_model, fuse_in_blocks
from qz_core.fusion import relu6_to_relu

__all__ = ["QuantizableInvertedResidual", "QuantizableMobileNetV2", "mobilenet_v2"]


class QuantizableInvertedResidual(InvertedResidual):
    """MobileNetV2's InvertedResidual with its residual add through ``FloatFunctional``.

    Only blocks that add own a ``skip_add`` (an unused one would hold an uncalibrated observer).
    """

    __constants__ = ["use_res_connect"]  # a TorchScript constant: only blocks that add compile the add

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.use_res_connect:
            self.skip_add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return self.skip_add.add(x, self.conv(x))
        return self.conv(x)


class QuantizableMobileNetV2(MobileNetV2):
    """torchvision's MobileNetV2 between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("block", QuantizableInvertedResidual)
        super().__init__(*args, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-ReLU6 as ReLU) in the inverted residuals, with ``level='all'`` the stem and head too."""
        fuse_in_blocks(self, QuantizableInvertedResidual, level, is_qat, prepare_scope=relu6_to_relu)


_BASE = ModelSpec(
    name="mobilenet_v2",
    task=TASK,
    family="mobilenet",
    make_model=QuantizableMobileNetV2,
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("mobilenet"),
    description="torchvision's MobileNetV2 architecture",
)

mobilenet_v2 = define_model(_BASE.variant(name="mobilenet_v2", weights_enum=MobileNet_V2_Weights))
