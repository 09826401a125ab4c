"""Quantizable SqueezeNet 1.0 and 1.1."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import squeezenet as tv
from torchvision.models.squeezenet import Fire, SqueezeNet

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, define_model, fuse_modules, fuse_sequentials

__all__ = ["QuantizableFire", "QuantizableSqueezeNet", "squeezenet1_0", "squeezenet1_1"]


class QuantizableFire(Fire):
    """Fire module whose concatenation of the two expand branches runs through ``FloatFunctional``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.squeeze_activation = nn.ReLU()
        self.expand1x1_activation = nn.ReLU()
        self.expand3x3_activation = nn.ReLU()
        self.cat = FloatFunctional()

    @classmethod
    def like(cls, fire: Fire) -> QuantizableFire:
        """A quantizable Fire with the shapes and weights of ``fire``."""
        new = cls(fire.inplanes, fire.squeeze.out_channels, fire.expand1x1.out_channels, fire.expand3x3.out_channels)
        new.load_state_dict(fire.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return self.cat.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )

    def fusion_groups(self) -> list[list[str]]:
        return [[name, f"{name}_activation"] for name in ("squeeze", "expand1x1", "expand3x3")]


class QuantizableSqueezeNet(SqueezeNet):
    """torchvision's SqueezeNet with quantizable Fire modules, between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SqueezeNet builds its Fire modules from the module-level class: swap in quantizable
        # ones, keeping torchvision's initial weights (same seed, same model).
        for name, child in list(self.features.named_children()):
            if isinstance(child, Fire):
                setattr(self.features, name, QuantizableFire.like(child))
        for seq in (self.features, self.classifier):
            for name, child in seq.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(seq, name, nn.ReLU())
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.classifier(self.features(self.quant(x)))
        return self.dequant(torch.flatten(x, 1))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-ReLU in the Fire modules, and with ``level='all'`` the stem and classifier."""
        groups = []
        for name, module in self.named_modules():
            if isinstance(module, QuantizableFire):
                groups += [[f"{name}.{m}" for m in group] for group in module.fusion_groups()]
        fuse_modules(self, groups, is_qat)
        if level == "all":
            fuse_sequentials(self, is_qat)


_BASE = ModelSpec(
    name="squeezenet",
    task=TASK,
    family="squeezenet",
    make_model=QuantizableSqueezeNet,
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("squeezenet"),
    description="torchvision's SqueezeNet architecture",
)

squeezenet1_0 = define_model(
    _BASE.variant(name="squeezenet1_0", weights_enum=tv.SqueezeNet1_0_Weights, fixed_kwargs={"version": "1_0"})
)
squeezenet1_1 = define_model(
    _BASE.variant(name="squeezenet1_1", weights_enum=tv.SqueezeNet1_1_Weights, fixed_kwargs={"version": "1_1"})
)
