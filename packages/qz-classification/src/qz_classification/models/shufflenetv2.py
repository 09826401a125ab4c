"""Quantizable ShuffleNetV2 (x0.5, x1.0, x1.5, x2.0)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import shufflenetv2 as tv
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2, channel_shuffle

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, define_model, fuse_in_blocks

__all__ = [
    "QuantizableInvertedResidual",
    "QuantizableShuffleNetV2",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
]


class QuantizableInvertedResidual(InvertedResidual):
    """ShuffleNetV2's unit with its concatenation through ``FloatFunctional``.

    The channel split and ``channel_shuffle`` (view, transpose, contiguous) run on quantized tensors as is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cat = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            # torchvision's x.chunk(2, dim=1) as reshape + select: the same values, and unlike
            # chunk (an onnx::Slice) exportable to ONNX when x is quantized.
            halves = x.reshape(x.shape[0], 2, x.shape[1] // 2, x.shape[2], x.shape[3])
            x1, x2 = halves.select(1, 0), halves.select(1, 1)
            out = self.cat.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = self.cat.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class QuantizableShuffleNetV2(ShuffleNetV2):
    """torchvision's ShuffleNetV2 between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("inverted_residual", QuantizableInvertedResidual)
        super().__init__(*args, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-ReLU) in the units' branches, and with ``level='all'`` conv1 and conv5 too."""
        fuse_in_blocks(self, QuantizableInvertedResidual, level, is_qat)


def _arch(stages_out_channels: list[int]) -> Callable[..., QuantizableShuffleNetV2]:
    return partial(QuantizableShuffleNetV2, [4, 8, 4], stages_out_channels)


_BASE = ModelSpec(
    name="shufflenet_v2",
    task=TASK,
    family="shufflenet",
    make_model=_arch([24, 116, 232, 464, 1024]),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("shufflenet"),
    description="torchvision's ShuffleNetV2 architecture",
)

shufflenet_v2_x0_5 = define_model(
    _BASE.variant(
        name="shufflenet_v2_x0_5", make_model=_arch([24, 48, 96, 192, 1024]), weights_enum=tv.ShuffleNet_V2_X0_5_Weights
    )
)
shufflenet_v2_x1_0 = define_model(
    _BASE.variant(
        name="shufflenet_v2_x1_0",
        make_model=_arch([24, 116, 232, 464, 1024]),
        weights_enum=tv.ShuffleNet_V2_X1_0_Weights,
    )
)
shufflenet_v2_x1_5 = define_model(
    _BASE.variant(
        name="shufflenet_v2_x1_5",
        make_model=_arch([24, 176, 352, 704, 1024]),
        weights_enum=tv.ShuffleNet_V2_X1_5_Weights,
    )
)
shufflenet_v2_x2_0 = define_model(
    _BASE.variant(
        name="shufflenet_v2_x2_0",
        make_model=_arch([24, 244, 488, 976, 2048]),
        weights_enum=tv.ShuffleNet_V2_X2_0_Weights,
    )
)
