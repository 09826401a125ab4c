"""Quantizable MobileNetV3 (large and small)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.mobilenetv3 import (
    InvertedResidual,
    InvertedResidualConfig,
    MobileNet_V3_Large_Weights,
    MobileNet_V3_Small_Weights,
    MobileNetV3,
    _mobilenet_v3_conf,
)

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, define_model, fuse_modules, sequential_fusion_groups
from qz_core.fusion import check_fuse_level
from qz_core.modules import QuantizableSqueezeExcitation

__all__ = [
    "QuantizableInvertedResidual",
    "QuantizableMobileNetV3",
    "QuantizableSqueezeExcitation",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]


class QuantizableInvertedResidual(InvertedResidual):
    """MobileNetV3's InvertedResidual with a quantizable SE and a ``FloatFunctional`` residual add."""

    __constants__ = ["use_res_connect"]  # a TorchScript constant: only blocks that add compile the add

    def __init__(
        self,
        cnf: InvertedResidualConfig,
        norm_layer: Callable[..., nn.Module],
        se_layer: Callable[..., nn.Module] = partial(QuantizableSqueezeExcitation, scale_activation=nn.Hardsigmoid),
    ) -> None:
        super().__init__(cnf, norm_layer, se_layer=se_layer)
        if self.use_res_connect:
            self.skip_add = FloatFunctional()

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            return self.skip_add.add(result, input)
        return result


class QuantizableMobileNetV3(MobileNetV3):
    """torchvision's MobileNetV3 between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("block", QuantizableInvertedResidual)
        super().__init__(*args, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-ReLU) and SE fc1-ReLU in the inverted residuals; ``level='all'``: stem and head too.

        Hardswish does not fuse: conv-bn runs before it fuse, and Hardswish runs as its own INT8 op.
        """
        if check_fuse_level(level) == "none":
            return
        scopes = [(n, m) for n, m in self.named_modules() if isinstance(m, QuantizableInvertedResidual)]
        if level == "all":
            scopes = [("", self)]
        groups = []
        for name, scope in scopes:
            groups += sequential_fusion_groups(scope, prefix=name)
            for se_name, se in scope.named_modules(prefix=name):
                if isinstance(se, QuantizableSqueezeExcitation):
                    groups += [[f"{se_name}.{m}" for m in group] for group in se.fusion_groups()]
        fuse_modules(self, groups, is_qat)


def _make_mobilenet_v3(arch: str, **kwargs: Any) -> QuantizableMobileNetV3:
    setting, last_channel = _mobilenet_v3_conf(arch, **kwargs)
    return QuantizableMobileNetV3(setting, last_channel, **kwargs)


_BASE = ModelSpec(
    name="mobilenet_v3",
    task=TASK,
    family="mobilenet",
    make_model=partial(_make_mobilenet_v3, "mobilenet_v3_large"),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("mobilenet"),
    description="torchvision's MobileNetV3 architecture (``width_mult``, ``reduced_tail``, ``dilated``)",
)

mobilenet_v3_large = define_model(
    _BASE.variant(
        name="mobilenet_v3_large",
        make_model=partial(_make_mobilenet_v3, "mobilenet_v3_large"),
        weights_enum=MobileNet_V3_Large_Weights,
    )
)
mobilenet_v3_small = define_model(
    _BASE.variant(
        name="mobilenet_v3_small",
        make_model=partial(_make_mobilenet_v3, "mobilenet_v3_small"),
        weights_enum=MobileNet_V3_Small_Weights,
    )
)
