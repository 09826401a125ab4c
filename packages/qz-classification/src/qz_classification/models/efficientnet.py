"""Quantizable EfficientNet B0-B7 and EfficientNetV2 S/M/L.

PyTorch has no INT8 SiLU kernel, so SiLU runs as ``x * sigmoid(x)``: a quantized sigmoid (fixed
1/256 output scale) and a quantized multiply. The squeeze-excitation scale and the residual add
run through ``FloatFunctional``; every other layer has an INT8 kernel, so no part stays in float.
Unquantized, each model computes exactly what torchvision's computes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import efficientnet as tv
from torchvision.models.efficientnet import EfficientNet, FusedMBConv, MBConv

from qz_classification._registry import register_classifier
from qz_core import QzError, build_quantizable, fuse_modules, sequential_fusion_groups
from qz_core.builder import WeightsArg
from qz_core.modules import QuantizableSiLU, QuantizableSqueezeExcitation, replace_silu

__all__ = [
    "QuantizableEfficientNet",
    "QuantizableFusedMBConv",
    "QuantizableMBConv",
    "QuantizableSiLU",
    "QuantizableSqueezeExcitation",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "efficientnet_v2_l",
]


class QuantizableMBConv(MBConv):
    """MBConv with a quantizable squeeze-excitation and a ``FloatFunctional`` residual add."""

    def __init__(self, cnf: tv.MBConvConfig, stochastic_depth_prob: float, norm_layer: Any) -> None:
        super().__init__(cnf, stochastic_depth_prob, norm_layer, se_layer=QuantizableSqueezeExcitation)
        if self.use_res_connect:  # only blocks that add: an unused FloatFunctional would leave an idle observer
            self.skip_add = FloatFunctional()

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            # StochasticDepth is the identity in eval; in QAT training it drops rows before the add's observer.
            result = self.skip_add.add(self.stochastic_depth(result), input)
        return result


class QuantizableFusedMBConv(FusedMBConv):
    """FusedMBConv (EfficientNetV2) with a ``FloatFunctional`` residual add."""

    def __init__(self, cnf: tv.FusedMBConvConfig, stochastic_depth_prob: float, norm_layer: Any) -> None:
        super().__init__(cnf, stochastic_depth_prob, norm_layer)
        if self.use_res_connect:
            self.skip_add = FloatFunctional()

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.skip_add.add(self.stochastic_depth(result), input)
        return result


_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {MBConv: QuantizableMBConv, FusedMBConv: QuantizableFusedMBConv}


class QuantizableEfficientNet(EfficientNet):
    """torchvision's EfficientNet (V1 or V2) between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        replace_silu(self)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn in the (Fused)MBConv blocks, and with ``level='all'`` the stem and head too.

        SiLU does not fuse: it follows the fused conv as a quantized sigmoid and multiply.
        """
        blocks = (QuantizableMBConv, QuantizableFusedMBConv)
        groups = []
        for name, module in self.named_modules():
            if isinstance(module, blocks):
                groups += sequential_fusion_groups(module.block, prefix=f"{name}.block")
        if level == "all":
            last = len(self.features) - 1
            groups += sequential_fusion_groups(self.features[0], prefix="features.0")
            groups += sequential_fusion_groups(self.features[last], prefix=f"features.{last}")
        fuse_modules(self, groups, is_qat)


def _efficientnet(
    arch: str,
    conf: dict[str, float],
    weights_enum: type[tv.WeightsEnum],
    weights: WeightsArg,
    progress: bool,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    **kwargs: Any,
) -> QuantizableEfficientNet:
    setting, last_channel = tv._efficientnet_conf(arch, **conf)
    for cnf in setting:
        cnf.block = _BLOCKS[cnf.block]
    return build_quantizable(
        lambda **kw: QuantizableEfficientNet(setting, last_channel=last_channel, **kw),
        weights=weights,
        weights_enum=weights_enum,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )


def _variant(
    name: str,
    weights_enum: type[tv.WeightsEnum],
    dropout: float,
    input_size: int,
    norm_layer: Any = None,
    **conf: float,
):
    """Defines and registers the public builder ``name`` as torchvision's builder configures it."""

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> QuantizableEfficientNet:
        kwargs["dropout"] = kwargs.pop("dropout", dropout)
        if norm_layer is not None:
            if "norm_layer" in kwargs:
                raise QzError(f"{name} fixes norm_layer to {norm_layer}; do not pass norm_layer.")
            kwargs["norm_layer"] = norm_layer
        return _efficientnet(name, conf, weights_enum, weights, progress, quantize, is_qat, skip_fuse, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"Quantizable {name} (torchvision architecture, weights ``{weights_enum.__name__}``).\n\n"
        "Args:\n"
        "    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.\n"
        "    progress: show a download progress bar.\n"
        "    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).\n"
        "    is_qat: prepare for quantization-aware training.\n"
        "    skip_fuse: leave fusion to the caller.\n"
        "    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``EfficientNet`` arguments.\n"
    )
    size = (input_size, input_size)
    return register_classifier(name, weights_enum, family="efficientnet", input_size=size)(builder)


# Dropout, norm layer and scaling exactly as torchvision's builders; input size = the weights' crop size.
_BN_B5 = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
_BN_V2 = partial(nn.BatchNorm2d, eps=1e-03)
efficientnet_b0 = _variant("efficientnet_b0", tv.EfficientNet_B0_Weights, 0.2, 224, width_mult=1.0, depth_mult=1.0)
efficientnet_b1 = _variant("efficientnet_b1", tv.EfficientNet_B1_Weights, 0.2, 240, width_mult=1.0, depth_mult=1.1)
efficientnet_b2 = _variant("efficientnet_b2", tv.EfficientNet_B2_Weights, 0.3, 288, width_mult=1.1, depth_mult=1.2)
efficientnet_b3 = _variant("efficientnet_b3", tv.EfficientNet_B3_Weights, 0.3, 300, width_mult=1.2, depth_mult=1.4)
efficientnet_b4 = _variant("efficientnet_b4", tv.EfficientNet_B4_Weights, 0.4, 380, width_mult=1.4, depth_mult=1.8)
efficientnet_b5 = _variant(
    "efficientnet_b5", tv.EfficientNet_B5_Weights, 0.4, 456, _BN_B5, width_mult=1.6, depth_mult=2.2
)
efficientnet_b6 = _variant(
    "efficientnet_b6", tv.EfficientNet_B6_Weights, 0.5, 528, _BN_B5, width_mult=1.8, depth_mult=2.6
)
efficientnet_b7 = _variant(
    "efficientnet_b7", tv.EfficientNet_B7_Weights, 0.5, 600, _BN_B5, width_mult=2.0, depth_mult=3.1
)
efficientnet_v2_s = _variant("efficientnet_v2_s", tv.EfficientNet_V2_S_Weights, 0.2, 384, _BN_V2)
efficientnet_v2_m = _variant("efficientnet_v2_m", tv.EfficientNet_V2_M_Weights, 0.3, 480, _BN_V2)
efficientnet_v2_l = _variant("efficientnet_v2_l", tv.EfficientNet_V2_L_Weights, 0.4, 480, _BN_V2)
