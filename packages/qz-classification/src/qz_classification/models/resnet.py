"""Quantizable ResNet, ResNeXt and Wide ResNet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import resnet as tv
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from qz_classification._registry import define_classifier
from qz_core import fuse_modules

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


def _variant(name: str, block: type, layers: list[int], weights_enum: type, **arch: Any) -> Callable[..., nn.Module]:
    return define_classifier(
        name,
        weights_enum,
        "resnet",
        lambda **kw: QuantizableResNet(block, layers, **kw),
        architecture="ResNet",
        fixed=arch,
    )


_QB, _QN = QuantizableBasicBlock, QuantizableBottleneck
resnet18 = _variant("resnet18", _QB, [2, 2, 2, 2], tv.ResNet18_Weights)
resnet34 = _variant("resnet34", _QB, [3, 4, 6, 3], tv.ResNet34_Weights)
resnet50 = _variant("resnet50", _QN, [3, 4, 6, 3], tv.ResNet50_Weights)
resnet101 = _variant("resnet101", _QN, [3, 4, 23, 3], tv.ResNet101_Weights)
resnet152 = _variant("resnet152", _QN, [3, 8, 36, 3], tv.ResNet152_Weights)
resnext50_32x4d = _variant(
    "resnext50_32x4d", _QN, [3, 4, 6, 3], tv.ResNeXt50_32X4D_Weights, groups=32, width_per_group=4
)
resnext101_32x8d = _variant(
    "resnext101_32x8d", _QN, [3, 4, 23, 3], tv.ResNeXt101_32X8D_Weights, groups=32, width_per_group=8
)
resnext101_64x4d = _variant(
    "resnext101_64x4d", _QN, [3, 4, 23, 3], tv.ResNeXt101_64X4D_Weights, groups=64, width_per_group=4
)
wide_resnet50_2 = _variant("wide_resnet50_2", _QN, [3, 4, 6, 3], tv.Wide_ResNet50_2_Weights, width_per_group=128)
wide_resnet101_2 = _variant("wide_resnet101_2", _QN, [3, 4, 23, 3], tv.Wide_ResNet101_2_Weights, width_per_group=128)
