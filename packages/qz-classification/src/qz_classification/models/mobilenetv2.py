"""Quantizable MobileNetV2."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNet_V2_Weights, MobileNetV2
from torchvision.ops.misc import Conv2dNormActivation

from qz_classification._registry import register_classifier
from qz_core import build_quantizable, fuse_in_blocks
from qz_core.builder import WeightsArg

__all__ = ["QuantizableInvertedResidual", "QuantizableMobileNetV2", "mobilenet_v2", "relu6_to_relu"]


def relu6_to_relu(module: nn.Module) -> int:
    """Replaces the ReLU6 of every conv-bn-ReLU6 run in ``module`` by a ReLU, so the run can fuse.

    torch has no fused conv-bn-ReLU6; like torchvision's quantizable MobileNets, qz quantizes
    the fused conv-bn-ReLU instead (the INT8 output range is calibrated anyway). Only called
    when fusing, so an unquantized model keeps ReLU6 and computes exactly torchvision's output.

    Returns:
        The number of ReLU6 replaced.
    """
    count = 0
    for child in module.modules():
        if type(child) is Conv2dNormActivation and [type(m) for m in child] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]:
            child[2] = nn.ReLU(inplace=False)
            count += 1
    return count


class QuantizableInvertedResidual(InvertedResidual):
    """MobileNetV2's InvertedResidual with its residual add through ``FloatFunctional``.

    Only blocks that add own a ``skip_add`` (an unused one would hold an uncalibrated observer).
    """

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


@register_classifier("mobilenet_v2", MobileNet_V2_Weights, family="mobilenet")
def mobilenet_v2(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    quantize: bool = False,
    is_qat: bool = False,
    skip_fuse: bool = False,
    **kwargs: Any,
) -> QuantizableMobileNetV2:
    """Quantizable MobileNetV2 (torchvision architecture, weights ``MobileNet_V2_Weights``).

    Args:
        weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.
        progress: show a download progress bar.
        quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
        is_qat: prepare for quantization-aware training.
        skip_fuse: leave fusion to the caller.
        **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``MobileNetV2`` arguments.
    """
    return build_quantizable(
        QuantizableMobileNetV2,
        weights=weights,
        weights_enum=MobileNet_V2_Weights,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )
