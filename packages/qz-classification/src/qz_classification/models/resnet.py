"""Quantizable ResNet, ResNeXt and Wide ResNet."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import resnet as tv
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, define_model, fuse_modules

__all__ = [
    "QuantizableBasicBlock",
    "QuantizableBottleneck",
    "QuantizableResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


class QuantizableBasicBlock(BasicBlock):
    """BasicBlock whose residual add-and-ReLU runs through ``FloatFunctional``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_relu = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.add_relu.add_relu(out, identity)

    def fusion_groups(self) -> list[list[str]]:
        groups = [["conv1", "bn1", "relu"], ["conv2", "bn2"]]
        return groups + ([["downsample.0", "downsample.1"]] if self.downsample is not None else [])


class QuantizableBottleneck(Bottleneck):
    """Bottleneck with one ReLU per conv (so each can fuse) and a ``FloatFunctional`` add-ReLU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.add_relu = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.add_relu.add_relu(out, identity)

    def fusion_groups(self) -> list[list[str]]:
        groups = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "bn3"]]
        return groups + ([["downsample.0", "downsample.1"]] if self.downsample is not None else [])


class QuantizableResNet(ResNet):
    """torchvision's ResNet between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-relu) in the residual blocks, and with ``level='all'`` the stem too."""
        groups = [["conv1", "bn1", "relu"]] if level == "all" else []
        for name, module in self.named_modules():
            if isinstance(module, (QuantizableBasicBlock, QuantizableBottleneck)):
                groups += [[f"{name}.{m}" for m in group] for group in module.fusion_groups()]
        fuse_modules(self, groups, is_qat)


def _arch(block: type, *layers: int) -> Callable[..., QuantizableResNet]:
    return partial(QuantizableResNet, block, list(layers))


_QB, _QN = QuantizableBasicBlock, QuantizableBottleneck
_BASE = ModelSpec(
    name="resnet",
    task=TASK,
    family="resnet",
    make_model=_arch(_QB, 2, 2, 2, 2),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("resnet"),
    description="torchvision's ResNet architecture",
)
_RESNEXT = _BASE.variant(description="torchvision's ResNeXt architecture")
_WIDE = _BASE.variant(description="torchvision's Wide ResNet architecture")

resnet18 = define_model(
    _BASE.variant(name="resnet18", make_model=_arch(_QB, 2, 2, 2, 2), weights_enum=tv.ResNet18_Weights)
)
resnet34 = define_model(
    _BASE.variant(name="resnet34", make_model=_arch(_QB, 3, 4, 6, 3), weights_enum=tv.ResNet34_Weights)
)
resnet50 = define_model(
    _BASE.variant(name="resnet50", make_model=_arch(_QN, 3, 4, 6, 3), weights_enum=tv.ResNet50_Weights)
)
resnet101 = define_model(
    _BASE.variant(name="resnet101", make_model=_arch(_QN, 3, 4, 23, 3), weights_enum=tv.ResNet101_Weights)
)
resnet152 = define_model(
    _BASE.variant(name="resnet152", make_model=_arch(_QN, 3, 8, 36, 3), weights_enum=tv.ResNet152_Weights)
)
resnext50_32x4d = define_model(
    _RESNEXT.variant(
        name="resnext50_32x4d",
        make_model=_arch(_QN, 3, 4, 6, 3),
        weights_enum=tv.ResNeXt50_32X4D_Weights,
        fixed_kwargs={"groups": 32, "width_per_group": 4},
    )
)
resnext101_32x8d = define_model(
    _RESNEXT.variant(
        name="resnext101_32x8d",
        make_model=_arch(_QN, 3, 4, 23, 3),
        weights_enum=tv.ResNeXt101_32X8D_Weights,
        fixed_kwargs={"groups": 32, "width_per_group": 8},
    )
)
resnext101_64x4d = define_model(
    _RESNEXT.variant(
        name="resnext101_64x4d",
        make_model=_arch(_QN, 3, 4, 23, 3),
        weights_enum=tv.ResNeXt101_64X4D_Weights,
        fixed_kwargs={"groups": 64, "width_per_group": 4},
    )
)
wide_resnet50_2 = define_model(
    _WIDE.variant(
        name="wide_resnet50_2",
        make_model=_arch(_QN, 3, 4, 6, 3),
        weights_enum=tv.Wide_ResNet50_2_Weights,
        fixed_kwargs={"width_per_group": 128},
    )
)
wide_resnet101_2 = define_model(
    _WIDE.variant(
        name="wide_resnet101_2",
        make_model=_arch(_QN, 3, 4, 23, 3),
        weights_enum=tv.Wide_ResNet101_2_Weights,
        fixed_kwargs={"width_per_group": 128},
    )
)
