"""Quantizable RegNetX and RegNetY (torchvision's 15 variants).

Every op runs in INT8: conv-bn(-relu) fuse, the residual add-and-ReLU goes through
``FloatFunctional.add_relu`` and RegNetY's squeeze-excitation multiply through
``FloatFunctional.mul`` (its sigmoid has an INT8 kernel with fixed output scale 1/256).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import regnet as tv
from torchvision.models.regnet import BlockParams, RegNet, ResBottleneckBlock

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, QzError, define_model, fuse_modules, sequential_fusion_groups
from qz_core.modules import QuantizableSqueezeExcitation

__all__ = [
    "QuantizableResBottleneckBlock",
    "QuantizableRegNet",
    "QuantizableSqueezeExcitation",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_1_6gf",
    "regnet_x_3_2gf",
    "regnet_x_8gf",
    "regnet_x_16gf",
    "regnet_x_32gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_1_6gf",
    "regnet_y_3_2gf",
    "regnet_y_8gf",
    "regnet_y_16gf",
    "regnet_y_32gf",
    "regnet_y_128gf",
]


class QuantizableResBottleneckBlock(ResBottleneckBlock):
    """ResBottleneckBlock with a ``FloatFunctional`` add-ReLU and a quantizable SE."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_relu = FloatFunctional()
        se = getattr(self.f, "se", None)
        if se is not None:  # same position and parameter names as torchvision's SE
            self.f.se = QuantizableSqueezeExcitation(
                se.fc1.in_channels, se.fc1.out_channels, activation=type(se.activation)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        return self.add_relu.add_relu(shortcut, self.f(x))

    def fusion_groups(self) -> list[list[str]]:
        """Conv-bn(-relu) groups of the projection and the transform, and the SE's fc1-relu."""
        groups = sequential_fusion_groups(self.f, "f")
        if self.proj is not None:
            groups += sequential_fusion_groups(self.proj, "proj")
        if isinstance(getattr(self.f, "se", None), QuantizableSqueezeExcitation):
            groups.append(["f.se.fc1", "f.se.activation"])
        return groups


class QuantizableRegNet(RegNet):
    """torchvision's RegNet between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("block_type") not in (None, QuantizableResBottleneckBlock):
            raise QzError(
                f"Quantizable RegNet uses QuantizableResBottleneckBlock; got block_type={kwargs['block_type']}."
            )
        kwargs["block_type"] = QuantizableResBottleneckBlock
        super().__init__(*args, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk_output(self.stem(self.quant(x)))
        x = self.avgpool(x).flatten(start_dim=1)
        return self.dequant(self.fc(x))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-relu) in the residual blocks, and with ``level='all'`` the stem too."""
        groups = sequential_fusion_groups(self.stem, "stem") if level == "all" else []
        for name, module in self.named_modules():
            if isinstance(module, QuantizableResBottleneckBlock):
                groups += [[f"{name}.{m}" for m in group] for group in module.fusion_groups()]
        fuse_modules(self, groups, is_qat)


def _make_regnet(params: dict[str, Any], **kwargs: Any) -> QuantizableRegNet:
    return QuantizableRegNet(BlockParams.from_init_params(**params), **kwargs)


def _arch(**params: Any) -> Callable[..., QuantizableRegNet]:
    """torchvision's ``BlockParams.from_init_params`` arguments of one variant."""
    return partial(_make_regnet, params)


_BASE = ModelSpec(
    name="regnet",
    task=TASK,
    family="regnet",
    make_model=_arch(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("regnet"),
    description="torchvision's RegNet architecture",
)

regnet_y_400mf = define_model(
    _BASE.variant(
        name="regnet_y_400mf",
        make_model=_arch(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_400MF_Weights,
    )
)
regnet_y_800mf = define_model(
    _BASE.variant(
        name="regnet_y_800mf",
        make_model=_arch(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_800MF_Weights,
    )
)
regnet_y_1_6gf = define_model(
    _BASE.variant(
        name="regnet_y_1_6gf",
        make_model=_arch(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_1_6GF_Weights,
    )
)
regnet_y_3_2gf = define_model(
    _BASE.variant(
        name="regnet_y_3_2gf",
        make_model=_arch(depth=21, w_0=80, w_a=42.63, w_m=2.66, group_width=24, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_3_2GF_Weights,
    )
)
regnet_y_8gf = define_model(
    _BASE.variant(
        name="regnet_y_8gf",
        make_model=_arch(depth=17, w_0=192, w_a=76.82, w_m=2.19, group_width=56, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_8GF_Weights,
    )
)
regnet_y_16gf = define_model(
    _BASE.variant(
        name="regnet_y_16gf",
        make_model=_arch(depth=18, w_0=200, w_a=106.23, w_m=2.48, group_width=112, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_16GF_Weights,
    )
)
regnet_y_32gf = define_model(
    _BASE.variant(
        name="regnet_y_32gf",
        make_model=_arch(depth=20, w_0=232, w_a=115.89, w_m=2.53, group_width=232, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_32GF_Weights,
    )
)
regnet_y_128gf = define_model(
    _BASE.variant(
        name="regnet_y_128gf",
        make_model=_arch(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264, se_ratio=0.25),
        weights_enum=tv.RegNet_Y_128GF_Weights,
    )
)
regnet_x_400mf = define_model(
    _BASE.variant(
        name="regnet_x_400mf",
        make_model=_arch(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16),
        weights_enum=tv.RegNet_X_400MF_Weights,
    )
)
regnet_x_800mf = define_model(
    _BASE.variant(
        name="regnet_x_800mf",
        make_model=_arch(depth=16, w_0=56, w_a=35.73, w_m=2.28, group_width=16),
        weights_enum=tv.RegNet_X_800MF_Weights,
    )
)
regnet_x_1_6gf = define_model(
    _BASE.variant(
        name="regnet_x_1_6gf",
        make_model=_arch(depth=18, w_0=80, w_a=34.01, w_m=2.25, group_width=24),
        weights_enum=tv.RegNet_X_1_6GF_Weights,
    )
)
regnet_x_3_2gf = define_model(
    _BASE.variant(
        name="regnet_x_3_2gf",
        make_model=_arch(depth=25, w_0=88, w_a=26.31, w_m=2.25, group_width=48),
        weights_enum=tv.RegNet_X_3_2GF_Weights,
    )
)
regnet_x_8gf = define_model(
    _BASE.variant(
        name="regnet_x_8gf",
        make_model=_arch(depth=23, w_0=80, w_a=49.56, w_m=2.88, group_width=120),
        weights_enum=tv.RegNet_X_8GF_Weights,
    )
)
regnet_x_16gf = define_model(
    _BASE.variant(
        name="regnet_x_16gf",
        make_model=_arch(depth=22, w_0=216, w_a=55.59, w_m=2.1, group_width=128),
        weights_enum=tv.RegNet_X_16GF_Weights,
    )
)
regnet_x_32gf = define_model(
    _BASE.variant(
        name="regnet_x_32gf",
        make_model=_arch(depth=23, w_0=320, w_a=69.86, w_m=2.0, group_width=168),
        weights_enum=tv.RegNet_X_32GF_Weights,
    )
)
