"""Quantizable ConvNeXt (tiny, small, base, large).

Every op runs in INT8, no float island: the LayerNorms (quantized LayerNorm on channels-last
tensors), GELU (quantized GELU, keeping its input's scale), the Linear layers (quantized Linear
on channels-last 4D tensors) and the residual add (``FloatFunctional``). torchvision's
``LayerNorm2d`` (stem, downsampling, head) becomes a plain ``nn.LayerNorm`` between permutes, so
``convert`` maps it to the quantized LayerNorm while the state dict keeps torchvision's keys.
``fuse_model`` folds each block's ``layer_scale`` into the preceding Linear, so the per-channel
multiply disappears from the INT8 graph.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import convnext as tv
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, QzError, define_model

__all__ = [
    "ChannelsFirstNorm",
    "QuantizableCNBlock",
    "QuantizableConvNeXt",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
]


class ChannelsFirstNorm(nn.Sequential):
    """A Sequential whose ``norm`` child (an ``nn.LayerNorm``) normalizes the channels of NCHW input.

    It computes what torchvision's ``LayerNorm2d`` computes (permute, layer norm, permute back),
    with the norm an exact ``nn.LayerNorm`` that ``convert`` swaps for the quantized one.
    """

    def __init__(self, *modules: nn.Module, norm_index: int) -> None:
        super().__init__(*modules)
        self.norm_index = norm_index

    def forward(self, x: Tensor) -> Tensor:
        for i, module in enumerate(self):
            x = module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if i == self.norm_index else module(x)
        return x


class QuantizableCNBlock(CNBlock):
    """CNBlock with its residual add through ``FloatFunctional`` and a foldable ``layer_scale``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_add = FloatFunctional()

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.layer_scale is not None:
            result = self.layer_scale * result
        result = self.stochastic_depth(result)
        return self.skip_add.add(result, input)

    @torch.no_grad()
    def fold_layer_scale(self) -> None:
        """Multiplies ``layer_scale`` into the last Linear's weight and bias, then drops it."""
        if self.layer_scale is None:
            return
        linear = self.block[5]
        scale = self.layer_scale.detach().reshape(-1)
        linear.weight.mul_(scale[:, None])
        linear.bias.mul_(scale)
        self.layer_scale = None


class QuantizableConvNeXt(ConvNeXt):
    """torchvision's ConvNeXt between a QuantStub and a DeQuantStub, with quantizable norms."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("block") is not None or kwargs.get("norm_layer") is not None:
            raise QzError("Quantizable ConvNeXt builds its own blocks and norms; do not pass block or norm_layer.")
        super().__init__(*args, block=QuantizableCNBlock, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
        for i, stage in enumerate(self.features):
            if i == 0:
                self.features[0] = ChannelsFirstNorm(*stage, norm_index=1)
            elif isinstance(stage[0], nn.LayerNorm):
                self.features[i] = ChannelsFirstNorm(*stage, norm_index=0)
        self.classifier = ChannelsFirstNorm(*self.classifier, norm_index=0)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Folds each block's ``layer_scale`` into its last Linear (nothing else fuses in ConvNeXt).

        ``is_qat`` and ``level`` are accepted for the shared builder sequence: the fold is the
        same for PTQ and QAT, and ConvNeXt has only residual blocks to fuse.
        """
        for module in self.modules():
            if isinstance(module, QuantizableCNBlock):
                module.fold_layer_scale()


def _make_convnext(setting: list[tuple[int, int | None, int]], **kwargs: Any) -> QuantizableConvNeXt:
    return QuantizableConvNeXt([CNBlockConfig(*row) for row in setting], **kwargs)


def _arch(setting: list[tuple[int, int | None, int]], depth_prob: float) -> Callable[..., QuantizableConvNeXt]:
    """One variant's stages, and its default ``stochastic_depth_prob`` (as torchvision's builders)."""
    return partial(_make_convnext, setting, stochastic_depth_prob=depth_prob)


_TINY = [(96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)]
_SMALL = [(96, 192, 3), (192, 384, 3), (384, 768, 27), (768, None, 3)]
_BASE_SIZE = [(128, 256, 3), (256, 512, 3), (512, 1024, 27), (1024, None, 3)]
_LARGE = [(192, 384, 3), (384, 768, 3), (768, 1536, 27), (1536, None, 3)]
_BASE = ModelSpec(
    name="convnext",
    task=TASK,
    family="convnext",
    make_model=_arch(_TINY, 0.1),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("convnext"),
    description="torchvision's ConvNeXt architecture; ``skip_fuse`` leaves the layer-scale fold to the caller",
)

convnext_tiny = define_model(
    _BASE.variant(name="convnext_tiny", make_model=_arch(_TINY, 0.1), weights_enum=tv.ConvNeXt_Tiny_Weights)
)
convnext_small = define_model(
    _BASE.variant(name="convnext_small", make_model=_arch(_SMALL, 0.4), weights_enum=tv.ConvNeXt_Small_Weights)
)
convnext_base = define_model(
    _BASE.variant(name="convnext_base", make_model=_arch(_BASE_SIZE, 0.5), weights_enum=tv.ConvNeXt_Base_Weights)
)
convnext_large = define_model(
    _BASE.variant(name="convnext_large", make_model=_arch(_LARGE, 0.5), weights_enum=tv.ConvNeXt_Large_Weights)
)
