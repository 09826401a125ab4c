"""Quantizable EfficientNet B0-B7 and EfficientNetV2 S/M/L.

PyTorch has no INT8 SiLU kernel, so SiLU runs as ``x * sigmoid(x)``: a quantized sigmoid (fixed
1/256 output scale) and a quantized multiply. The squeeze-excitation scale and the residual add
run through ``FloatFunctional``; every other layer has an INT8 kernel, so no part stays in float.
Unquantized, each model computes exactly what torchvision's computes.

In ONNX, SiLU stays QDQ sigmoid and multiply, which onnxruntime runs as QLinearSigmoid (a 256-entry
table) and QLinearMul: a uint8 Gather table ran 6x slower in onnxruntime and needed int32 indices and
layout reorders in OpenVINO, and a float island (DQ -> Sigmoid -> Mul -> Q) ran onnxruntime 1.6x slower.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import efficientnet as tv
from torchvision.models.efficientnet import EfficientNet, FusedMBConv, MBConv

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, QzError, define_model, fuse_modules, sequential_fusion_groups
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

    __constants__ = ["use_res_connect"]  # a TorchScript constant: only blocks that add compile the add

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

    __constants__ = ["use_res_connect"]  # a TorchScript constant: only blocks that add compile the add

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


def _make_efficientnet(
    arch: str, conf: dict[str, float], fixed_norm_layer: Callable[..., nn.Module] | None, **kwargs: Any
) -> QuantizableEfficientNet:
    if fixed_norm_layer is not None:
        if "norm_layer" in kwargs:
            raise QzError(f"{arch} fixes norm_layer to {fixed_norm_layer}; do not pass norm_layer.")
        kwargs["norm_layer"] = fixed_norm_layer
    setting, last_channel = tv._efficientnet_conf(arch, **conf)
    for cnf in setting:
        cnf.block = _BLOCKS[cnf.block]
    return QuantizableEfficientNet(setting, last_channel=last_channel, **kwargs)


_BASE = ModelSpec(
    name="efficientnet",
    task=TASK,
    family="efficientnet",
    make_model=partial(_make_efficientnet, "efficientnet_b0", {"width_mult": 1.0, "depth_mult": 1.0}, None),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("efficientnet"),
    description="torchvision's EfficientNet architecture",
)


def _spec(
    name: str,
    weights_enum: type[tv.WeightsEnum],
    dropout: float,
    input_size: int,
    norm_layer: Callable[..., nn.Module] | None = None,
    **conf: float,
) -> ModelSpec:
    """The spec of ``name`` as torchvision's builder configures it; input size = the weights' crop size."""
    size = (input_size, input_size)
    return _BASE.variant(
        name=name,
        make_model=partial(_make_efficientnet, name, conf, norm_layer, dropout=dropout),
        weights_enum=weights_enum,
        input_size=size,
        preprocess=imagenet_preprocess(size),
    )


_BN_B5 = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
_BN_V2 = partial(nn.BatchNorm2d, eps=1e-03)

efficientnet_b0 = define_model(
    _spec("efficientnet_b0", tv.EfficientNet_B0_Weights, 0.2, 224, width_mult=1.0, depth_mult=1.0)
)
efficientnet_b1 = define_model(
    _spec("efficientnet_b1", tv.EfficientNet_B1_Weights, 0.2, 240, width_mult=1.0, depth_mult=1.1)
)
efficientnet_b2 = define_model(
    _spec("efficientnet_b2", tv.EfficientNet_B2_Weights, 0.3, 288, width_mult=1.1, depth_mult=1.2)
)
efficientnet_b3 = define_model(
    _spec("efficientnet_b3", tv.EfficientNet_B3_Weights, 0.3, 300, width_mult=1.2, depth_mult=1.4)
)
efficientnet_b4 = define_model(
    _spec("efficientnet_b4", tv.EfficientNet_B4_Weights, 0.4, 380, width_mult=1.4, depth_mult=1.8)
)
efficientnet_b5 = define_model(
    _spec("efficientnet_b5", tv.EfficientNet_B5_Weights, 0.4, 456, _BN_B5, width_mult=1.6, depth_mult=2.2)
)
efficientnet_b6 = define_model(
    _spec("efficientnet_b6", tv.EfficientNet_B6_Weights, 0.5, 528, _BN_B5, width_mult=1.8, depth_mult=2.6)
)
efficientnet_b7 = define_model(
    _spec("efficientnet_b7", tv.EfficientNet_B7_Weights, 0.5, 600, _BN_B5, width_mult=2.0, depth_mult=3.1)
)
efficientnet_v2_s = define_model(_spec("efficientnet_v2_s", tv.EfficientNet_V2_S_Weights, 0.2, 384, _BN_V2))
efficientnet_v2_m = define_model(_spec("efficientnet_v2_m", tv.EfficientNet_V2_M_Weights, 0.3, 480, _BN_V2))
efficientnet_v2_l = define_model(_spec("efficientnet_v2_l", tv.EfficientNet_V2_L_Weights, 0.4, 480, _BN_V2))
