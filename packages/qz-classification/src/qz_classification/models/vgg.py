"""Quantizable VGG 11/13/16/19, with and without BatchNorm."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import vgg as tv
from torchvision.models.vgg import VGG, cfgs, make_layers

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import BuildContext, ModelSpec, define_model, fuse_sequentials

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


def _make_vgg(cfg: str, batch_norm: bool, **kwargs: Any) -> QuantizableVGG:
    return QuantizableVGG(make_layers(cfgs[cfg], batch_norm=batch_norm), **kwargs)


def _arch(cfg: str, batch_norm: bool) -> Callable[..., QuantizableVGG]:
    return partial(_make_vgg, cfg, batch_norm)


def _skip_init_when_loading(context: BuildContext, kwargs: dict[str, Any]) -> None:
    """As torchvision: weights overwrite the initialization, so it is skipped.

    Weights without categories (VGG16 IMAGENET1K_FEATURES) keep the given ``num_classes``, as in torchvision.
    """
    if context.source is not None:
        kwargs.setdefault("init_weights", False)


_BASE = ModelSpec(
    name="vgg",
    task=TASK,
    family="vgg",
    make_model=_arch("A", False),
    adjust_kwargs=_skip_init_when_loading,
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("vgg"),
    description="torchvision's VGG architecture",
)

vgg11 = define_model(_BASE.variant(name="vgg11", make_model=_arch("A", False), weights_enum=tv.VGG11_Weights))
vgg11_bn = define_model(_BASE.variant(name="vgg11_bn", make_model=_arch("A", True), weights_enum=tv.VGG11_BN_Weights))
vgg13 = define_model(_BASE.variant(name="vgg13", make_model=_arch("B", False), weights_enum=tv.VGG13_Weights))
vgg13_bn = define_model(_BASE.variant(name="vgg13_bn", make_model=_arch("B", True), weights_enum=tv.VGG13_BN_Weights))
vgg16 = define_model(_BASE.variant(name="vgg16", make_model=_arch("D", False), weights_enum=tv.VGG16_Weights))
vgg16_bn = define_model(_BASE.variant(name="vgg16_bn", make_model=_arch("D", True), weights_enum=tv.VGG16_BN_Weights))
vgg19 = define_model(_BASE.variant(name="vgg19", make_model=_arch("E", False), weights_enum=tv.VGG19_Weights))
vgg19_bn = define_model(_BASE.variant(name="vgg19_bn", make_model=_arch("E", True), weights_enum=tv.VGG19_BN_Weights))
