"""What every quantizable segmenter shares: spec fields and hooks, backbones, stubs, upsampling, fusion."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation._utils import _SimpleSegmentationModel

from qz_classification.models.mobilenetv3 import QuantizableMobileNetV3, mobilenet_v3_large
from qz_classification.models.resnet import QuantizableResNet, resnet50, resnet101
from qz_core import BuildContext, QzError, fuse_modules, sequential_fusion_groups
from qz_core.builder import WeightsArg
from qz_core.fusion import check_fuse_level

FuseFn = Callable[[nn.Module, bool, str], None]
_RESNETS = {"resnet50": resnet50, "resnet101": resnet101}

TASK = "segmentation"
# torchvision's evaluation size for its segmentation weights (``SemanticSegmentation(resize_size=520)``
# resizes the shorter side to 520); a square 520x520 input stands for it in benchmarks.
INPUT_SIZE = (520, 520)
# Deployed INT8/FP32 latency ratio every segmenter must reach in ``qz bench`` (the whole model).
DEPLOYED_RATIO_TARGET = 0.4
# Built at build time only: an INT8 file holds every weight, so its rebuild needs no backbone weights.
TRANSIENT_KWARGS = ("weights_backbone",)


def check_num_classes(num_classes: int) -> int:
    """Returns ``num_classes`` if it is a positive integer, else raises."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise QzError(f"num_classes must be a positive integer; got {num_classes!r}.")
    return num_classes


def _no_backbone_weights_with_weights(context: BuildContext, kwargs: dict[str, Any]) -> None:
    if context.source is not None:
        kwargs["weights_backbone"] = None  # the full checkpoint overwrites the backbone anyway


def with_aux_head(context: BuildContext, kwargs: dict[str, Any]) -> None:
    """``adjust_kwargs`` of FCN and DeepLabV3: enum weights hold the aux head and turn ``aux_loss`` on.

    As torchvision does; a checkpoint file's aux head is checked by ``match_checkpoint`` instead.
    """
    source = context.source
    if source is not None and source.enum_member is not None and kwargs.setdefault("aux_loss", True) is not True:
        raise QzError(f"Weights {source.label} hold an aux classifier: aux_loss must be True.")
    _no_backbone_weights_with_weights(context, kwargs)


def without_aux_head(context: BuildContext, kwargs: dict[str, Any]) -> None:
    """``adjust_kwargs`` of LRASPP, which has no auxiliary classifier."""
    if kwargs.pop("aux_loss", None):
        raise QzError("LRASPP has no auxiliary classifier: aux_loss must be False or left out.")
    _no_backbone_weights_with_weights(context, kwargs)


class QuantizableIntermediateLayerGetter(IntermediateLayerGetter):
    """torchvision's IntermediateLayerGetter that fuses the way the backbone it wraps does.

    The getter keeps the backbone's child names (``conv1``, ``layer1``, ... or ``0``, ``1``, ...),
    so the backbone's ``fuse_model`` finds the same modules in it.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str], fuse: FuseFn) -> None:
        super().__init__(model, return_layers)
        self._fuse = fuse

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """The wrapped backbone's ``fuse_model``, applied to the layers the getter kept."""
        self._fuse(self, is_qat, level)


def resnet_backbone(
    arch: str, weights_backbone: WeightsArg, return_layers: dict[str, str]
) -> QuantizableIntermediateLayerGetter:
    """qz's quantizable dilated ResNet (output stride 8), unfused, cut at ``return_layers``."""
    resnet = _RESNETS[arch](weights=weights_backbone, skip_fuse=True, replace_stride_with_dilation=[False, True, True])
    return QuantizableIntermediateLayerGetter(resnet, return_layers, fuse=QuantizableResNet.fuse_model)


def mobilenet_v3_features(weights_backbone: WeightsArg) -> tuple[nn.Sequential, list[int]]:
    """The features of qz's quantizable dilated MobileNetV3-Large and the indices of its stages.

    Stages as in torchvision's ``_segm_*`` builders: the stem, each strided block, the last layer.

    Speed note (measured, 1 thread, 33x33 maps): fbgemm (x86) runs *dilated* depthwise INT8 convs
    on a slow generic path, 95-490 ms each vs 0.2-2 ms undilated, so eager x86 INT8 LRASPP at 520 px
    is about 4x slower than FP32 (2858 vs 674 ms). qnnpack (1.7-6.5 ms) and onnxruntime on qz's INT8
    export (LRASPP at 520 px: 104 ms vs 395 ms eager FP32) are not affected.
    """
    features = mobilenet_v3_large(weights=weights_backbone, skip_fuse=True, dilated=True).features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    return features, stages


def mobilenet_v3_getter(features: nn.Sequential, return_layers: dict[str, str]) -> QuantizableIntermediateLayerGetter:
    """Cuts MobileNetV3 features at ``return_layers``; fuses as QuantizableMobileNetV3 does."""
    return QuantizableIntermediateLayerGetter(features, return_layers, fuse=QuantizableMobileNetV3.fuse_model)


def fuse_heads(model: nn.Module, names: list[str], is_qat: bool) -> None:
    """Fuses the conv-bn(-ReLU) runs in the nn.Sequential parts of the named heads of ``model``."""
    groups = []
    for name in names:
        head = getattr(model, name, None)
        if head is not None:
            groups += sequential_fusion_groups(head, prefix=name)
    fuse_modules(model, groups, is_qat)


def upsample_logits(logits: Tensor, size: Any, dequant: DeQuantStub) -> Tensor:
    """Dequantizes the INT8 logits, then upsamples them bilinearly to the input size in float.

    The upsampling is the model's last op (post-processing), and float is faster there. Measured
    (1 thread, batch 1, 21 classes upsampled to 520x520, channels-last INT8 logits as the quantized
    conv leaves them, median of 20): from 65x65, INT8 upsample + dequantize 46 ms vs dequantize +
    float upsample 10 ms on x86 (fbgemm), 30 ms vs 4.4 ms on qnnpack; from 33x33, 27 vs 8.3 ms
    (x86) and 24 vs 4.2 ms (qnnpack). Both agree to 0.05 (half a quantization step).
    """
    return F.interpolate(dequant(logits), size=size, mode="bilinear", align_corners=False)


class QuantizableSegmentationModel(_SimpleSegmentationModel):
    """torchvision's backbone + classifier (+ aux classifier) segmenter between quant/dequant stubs.

    Unconverted, it computes exactly what torchvision's model does: the stubs are identities.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None) -> None:
        super().__init__(backbone, classifier, aux_classifier)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        input_shape = x.shape[-2:]
        features = self.backbone(self.quant(x))
        result = OrderedDict()
        result["out"] = upsample_logits(self.classifier(features["out"]), input_shape, self.dequant)
        if self.aux_classifier is not None:
            result["aux"] = upsample_logits(self.aux_classifier(features["aux"]), input_shape, self.dequant)
        return result

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses the backbone as its own ``fuse_model`` does; with ``level='all'`` the heads too."""
        if check_fuse_level(level) == "none":
            return
        self.backbone.fuse_model(is_qat, level)
        if level == "all":
            fuse_heads(self, ["classifier", "aux_classifier"], is_qat)

    def match_checkpoint(self, state_dict: Mapping[str, Any]) -> None:
        """Names the fix when a checkpoint and the model disagree on the aux classifier."""
        aux_keys = [k for k in state_dict if k.startswith("aux_classifier.")]
        if aux_keys and self.aux_classifier is None:
            raise QzError(
                f"The checkpoint holds an aux classifier ({', '.join(aux_keys[:3])}, ...) that the model lacks: "
                "build it with aux_loss=True."
            )
        if not aux_keys and self.aux_classifier is not None:
            missing = [f"aux_classifier.{k}" for k in self.aux_classifier.state_dict()][:3]
            raise QzError(
                f"The checkpoint lacks the model's aux classifier ({', '.join(missing)}, ...): "
                "build it with aux_loss=False."
            )
