"""Quantizable SqueezeNet 1.0 and 1.1."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import squeezenet as tv
from torchvision.models.squeezenet import Fire, SqueezeNet

from qz_classification._registry import register_classifier
from qz_core import QzError, build_quantizable, fuse_modules, fuse_sequentials
from qz_core.builder import WeightsArg

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


def _squeezenet(
    version: str,
    weights_enum: type[tv.WeightsEnum],
    weights: WeightsArg,
    progress: bool,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    **kwargs: Any,
) -> QuantizableSqueezeNet:
    return build_quantizable(
        lambda **kw: QuantizableSqueezeNet(version, **kw),
        weights=weights,
        weights_enum=weights_enum,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )


def _variant(name: str, version: str, weights_enum: type):
    """Defines and registers the public builder ``name`` with the seed signature."""

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> QuantizableSqueezeNet:
        if "version" in kwargs:
            raise QzError(f"{name} has version {version!r}; do not pass version=.")
        return _squeezenet(version, weights_enum, weights, progress, quantize, is_qat, skip_fuse, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"Quantizable {name} (torchvision architecture, weights ``{weights_enum.__name__}``).\n\n"
        "Args:\n"
        "    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.\n"
        "    progress: show a download progress bar.\n"
        "    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).\n"
        "    is_qat: prepare for quantization-aware training.\n"
        "    skip_fuse: leave fusion to the caller.\n"
        "    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``SqueezeNet`` arguments.\n"
    )
    return register_classifier(name, weights_enum, family="squeezenet")(builder)


squeezenet1_0 = _variant("squeezenet1_0", "1_0", tv.SqueezeNet1_0_Weights)
squeezenet1_1 = _variant("squeezenet1_1", "1_1", tv.SqueezeNet1_1_Weights)
