"""Quantizable ShuffleNetV2 (x0.5, x1.0, x1.5, x2.0)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import shufflenetv2 as tv
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2, channel_shuffle

from qz_classification._registry import register_classifier
from qz_core import build_quantizable, fuse_in_blocks
from qz_core.builder import WeightsArg

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


def _variant(name: str, stages_repeats: list[int], stages_out_channels: list[int], weights_enum: type):
    """Defines and registers the public builder ``name`` with the seed signature."""

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> QuantizableShuffleNetV2:
        return build_quantizable(
            lambda **kw: QuantizableShuffleNetV2(stages_repeats, stages_out_channels, **kw),
            weights=weights,
            weights_enum=weights_enum,
            progress=progress,
            quantize=quantize,
            is_qat=is_qat,
            skip_fuse=skip_fuse,
            **kwargs,
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"Quantizable {name} (torchvision architecture, weights ``{weights_enum.__name__}``).\n\n"
        "Args:\n"
        "    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.\n"
        "    progress: show a download progress bar.\n"
        "    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).\n"
        "    is_qat: prepare for quantization-aware training.\n"
        "    skip_fuse: leave fusion to the caller.\n"
        "    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``ShuffleNetV2`` arguments (``num_classes``).\n"
    )
    return register_classifier(name, weights_enum, family="shufflenet")(builder)


_REPEATS = [4, 8, 4]
shufflenet_v2_x0_5 = _variant("shufflenet_v2_x0_5", _REPEATS, [24, 48, 96, 192, 1024], tv.ShuffleNet_V2_X0_5_Weights)
shufflenet_v2_x1_0 = _variant("shufflenet_v2_x1_0", _REPEATS, [24, 116, 232, 464, 1024], tv.ShuffleNet_V2_X1_0_Weights)
shufflenet_v2_x1_5 = _variant("shufflenet_v2_x1_5", _REPEATS, [24, 176, 352, 704, 1024], tv.ShuffleNet_V2_X1_5_Weights)
shufflenet_v2_x2_0 = _variant("shufflenet_v2_x2_0", _REPEATS, [24, 244, 488, 976, 2048], tv.ShuffleNet_V2_X2_0_Weights)
