"""Quantizable VGG 11/13/16/19, with and without BatchNorm."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import vgg as tv
from torchvision.models.vgg import VGG, cfgs, make_layers

from qz_classification._registry import register_classifier
from qz_core import build_quantizable, fuse_sequentials, resolve_weights
from qz_core.builder import WeightsArg

__all__ = [
    "QuantizableVGG",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
]


def _plain_relus(seq: nn.Sequential) -> None:
    # In-place ReLUs fuse as well, but quantized modules are clearer without in-place state.
    for name, child in seq.named_children():
        if isinstance(child, nn.ReLU):
            setattr(seq, name, nn.ReLU())


class QuantizableVGG(VGG):
    """torchvision's VGG between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_relus(self.features)
        _plain_relus(self.classifier)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(self.quant(x)))
        return self.dequant(self.classifier(torch.flatten(x, 1)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv(-bn)-ReLU in the features and, with ``level='all'``, linear-ReLU in the classifier.

        VGG has no residual blocks: ``level='blocks'`` fuses the convolutional features only.
        """
        fuse_sequentials(self.features, is_qat)
        if level == "all":
            fuse_sequentials(self.classifier, is_qat)


def _vgg(
    cfg: str,
    batch_norm: bool,
    weights_enum: type[tv.WeightsEnum],
    weights: WeightsArg,
    progress: bool,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    **kwargs: Any,
) -> QuantizableVGG:
    source = resolve_weights(weights, weights_enum)
    if source is not None:
        kwargs.setdefault("init_weights", False)  # as torchvision: the weights overwrite the init anyway
    # Weights without categories (VGG16 IMAGENET1K_FEATURES) keep the given num_classes, as in torchvision.
    has_categories = source is not None and source.meta.get("categories") is not None
    return build_quantizable(
        lambda **kw: QuantizableVGG(make_layers(cfgs[cfg], batch_norm=batch_norm), **kw),
        weights=weights,
        weights_enum=weights_enum,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        set_num_classes=source is None or has_categories,
        **kwargs,
    )


def _variant(name: str, cfg: str, batch_norm: bool, weights_enum: type):
    """Defines and registers the public builder ``name`` with the seed signature."""

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> QuantizableVGG:
        return _vgg(cfg, batch_norm, weights_enum, weights, progress, quantize, is_qat, skip_fuse, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"Quantizable {name} (torchvision architecture, weights ``{weights_enum.__name__}``).\n\n"
        "Args:\n"
        "    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.\n"
        "    progress: show a download progress bar.\n"
        "    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).\n"
        "    is_qat: prepare for quantization-aware training.\n"
        "    skip_fuse: leave fusion to the caller.\n"
        "    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``VGG`` arguments.\n"
    )
    return register_classifier(name, weights_enum, family="vgg")(builder)


vgg11 = _variant("vgg11", "A", False, tv.VGG11_Weights)
vgg11_bn = _variant("vgg11_bn", "A", True, tv.VGG11_BN_Weights)
vgg13 = _variant("vgg13", "B", False, tv.VGG13_Weights)
vgg13_bn = _variant("vgg13_bn", "B", True, tv.VGG13_BN_Weights)
vgg16 = _variant("vgg16", "D", False, tv.VGG16_Weights)
vgg16_bn = _variant("vgg16_bn", "D", True, tv.VGG16_BN_Weights)
vgg19 = _variant("vgg19", "E", False, tv.VGG19_Weights)
vgg19_bn = _variant("vgg19_bn", "E", True, tv.VGG19_BN_Weights)
