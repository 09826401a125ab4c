"""What every quantizable torchvision detector shares: INT8 FPN, dense heads, frozen-BN folding, its spec.

The INT8 region runs from the backbone's input (a QuantStub after GeneralizedRCNNTransform) to the
head outputs (DeQuantStubs); anchors, box decoding, NMS and postprocessing stay float, as torchvision
computes them. Quantizable parts are torchvision's own modules whose class is swapped for a subclass
(``upgrade``), so their weights, names and float arithmetic stay exactly torchvision's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import QuantStub
from torchvision.models import WeightsEnum
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from qz_core import BuildContext, ModelSpec, QzError, estimate_bn_stats, fuse_modules, sequential_fusion_groups
from qz_core.fusion import check_fuse_level, relu6_to_relu
from qz_detection.detector import Detection, Target, scale_boxes

# Deployed INT8/FP32 latency ratio qz bench asks of a whole detector (float NMS and decoding included).
DEPLOYED_RATIO_TARGET = 0.4
# Builder arguments used to build but not stored in the recipe (weights, downloads, trainability).
TRANSIENT_KWARGS = ("weights", "weights_backbone", "trainable_backbone_layers", "progress")

M = TypeVar("M", bound=nn.Module)


def upgrade(module: nn.Module, cls: type[M]) -> M:
    """Turns a built torchvision ``module`` into its quantizable subclass ``cls`` in place.

    The subclass adds only stateless quantization modules (stubs, FloatFunctional) in
    ``_init_quant``: weights and their names stay torchvision's.
    """
    module.__class__ = cls
    module._init_quant()
    return module


def flatten_levels(levels: Iterable[Tensor], columns: int) -> list[Tensor]:
    """(N, A*K, H, W) per level -> (N, HWA, K), as torchvision's heads reshape them."""
    out = []
    for t in levels:
        n, _, h, w = t.shape
        out.append(t.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns))
    return out


# --- Backbone and FPN -------------------------------------------------------------------------


class QuantizableLastLevelMaxPool(LastLevelMaxPool):
    """LastLevelMaxPool whose 1x1/stride-2 max pool becomes strided slicing on INT8 tensors.

    QNNPACK refuses 1x1 pooling ("failed to create max pooling with 1 pooling element: 1x1 pooling
    is meaningless"), which is what made Faster R-CNN fail on qnnpack. A 1x1 max pool with stride 2
    is subsampling: ``x[..., ::2, ::2]`` gives the same values on every engine.
    """

    def _init_quant(self) -> None:
        pass

    def forward(self, x: list[Tensor], y: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        if not x[-1].is_quantized:
            return super().forward(x, y, names)
        names.append("pool")
        x.append(x[-1][:, :, ::2, ::2].contiguous())
        return x, names


class QuantizableFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FPN with each top-down add through ``FloatFunctional`` (nearest upsampling is INT8 too)."""

    def _init_quant(self) -> None:
        self.top_down_add = nn.ModuleList(FloatFunctional() for _ in range(len(self.inner_blocks) - 1))
        if type(self.extra_blocks) is LastLevelMaxPool:
            upgrade(self.extra_blocks, QuantizableLastLevelMaxPool)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(x.keys())
        x = list(x.values())
        last_inner = self.get_result_from_inner_blocks(x[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(x) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(x[idx], idx)
            top_down = nn.functional.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            last_inner = self.top_down_add[idx].add(inner_lateral, top_down)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, x, names)
        return OrderedDict(zip(names, results, strict=True))


class QuantizableBackboneWithFPN(BackboneWithFPN):
    """Backbone body and FPN after a QuantStub: INT8 from the normalized image to the pyramid."""

    def _init_quant(self) -> None:
        self.quant = QuantStub()
        upgrade(self.fpn, QuantizableFeaturePyramidNetwork)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(self.quant(x)))


# --- Anchors ------------------------------------------------------------------------------------


def _shape_only(feature_maps: list[Tensor]) -> list[Tensor]:
    # Anchor generators read only shape, dtype and device: INT8 maps stand in as float views of one zero.
    return [torch.zeros((), device=f.device).expand(f.shape) if f.is_quantized else f for f in feature_maps]


class QuantAwareAnchorGenerator(AnchorGenerator):
    """AnchorGenerator that accepts INT8 feature maps (it takes their dtype for the anchors otherwise)."""

    def _init_quant(self) -> None:
        pass

    def forward(self, image_list: Any, feature_maps: list[Tensor]) -> list[Tensor]:
        return super().forward(image_list, _shape_only(feature_maps))


class QuantAwareDefaultBoxGenerator(DefaultBoxGenerator):
    """SSD's DefaultBoxGenerator that accepts INT8 feature maps."""

    def _init_quant(self) -> None:
        pass

    def forward(self, image_list: Any, feature_maps: list[Tensor]) -> list[Tensor]:
        return super().forward(image_list, _shape_only(feature_maps))


def quant_aware_anchors(generator: nn.Module) -> nn.Module:
    """Upgrades torchvision's anchor or default-box generator to take INT8 feature maps."""
    if type(generator) is AnchorGenerator:
        return upgrade(generator, QuantAwareAnchorGenerator)
    if type(generator) is DefaultBoxGenerator:
        return upgrade(generator, QuantAwareDefaultBoxGenerator)
    return generator


# --- Fusion -------------------------------------------------------------------------------------


def frozen_to_batchnorm(model: nn.Module) -> set[str]:
    """Replaces every FrozenBatchNorm2d with an eval-mode BatchNorm2d holding the same statistics.

    FrozenBatchNorm2d (torchvision's backbone norm when weights are given) is a fixed affine map
    the fuser does not know; as an eval BatchNorm2d it folds into the conv before it exactly.

    Returns:
        The dotted names of the replaced modules (their groups fold with the PTQ fuser even for QAT,
        so they stay frozen constants rather than becoming trainable BatchNorm).
    """
    replaced = set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is FrozenBatchNorm2d:
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps).eval()
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, key).copy_(getattr(child, key))
                bn.weight.requires_grad_(False)
                bn.bias.requires_grad_(False)
                setattr(module, child_name, bn)
                replaced.add(f"{name}.{child_name}" if name else child_name)
    return replaced


def block_fusion_groups(scope: nn.Module, prefix: str) -> list[list[str]]:
    """Conv-bn(-relu) groups in ``scope``: nn.Sequential runs, residual blocks, SE blocks, ResNet stems."""
    groups = sequential_fusion_groups(scope, prefix=prefix)
    for name, module in scope.named_modules(prefix=prefix):
        if hasattr(module, "fusion_groups"):
            groups += [[f"{name}.{m}" if name else m for m in g] for g in module.fusion_groups()]
        children = dict(module.named_children())
        if all(k in children for k in ("conv1", "bn1", "relu")) and not hasattr(module, "fusion_groups"):
            groups.append([f"{name}.{m}" if name else m for m in ("conv1", "bn1", "relu")])
    unique: dict[str, list[str]] = {}
    for group in groups:
        unique.setdefault(group[0], group)
    return list(unique.values())


def fuse_detector(model: nn.Module, scopes: Iterable[str], is_qat: bool) -> None:
    """Folds frozen BatchNorm, then fuses every conv-bn(-relu) and linear-relu group in ``scopes``.

    ReLU6 after conv-bn becomes ReLU (torch has no fused conv-bn-ReLU6), as in qz's MobileNetV2.
    """
    frozen = frozen_to_batchnorm(model)
    groups = []
    for name in scopes:
        scope = model.get_submodule(name)
        relu6_to_relu(scope)
        groups += block_fusion_groups(scope, name)
    constant = [g for g in groups if any(m in frozen for m in g)]
    fuse_modules(model, constant, is_qat=False)
    fuse_modules(model, [g for g in groups if g not in constant], is_qat)


def match_norm_to_checkpoint(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Turns FrozenBatchNorm2d back into BatchNorm2d where the checkpoint holds BatchNorm state.

    torchvision builds FrozenBatchNorm2d when given weights; a checkpoint saved from a model built
    without weights (BatchNorm2d, with ``num_batches_tracked``) loads as that model, bit for bit.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            key = f"{name}.{child_name}" if name else child_name
            if type(child) is FrozenBatchNorm2d and f"{key}.num_batches_tracked" in state_dict:
                setattr(module, child_name, nn.BatchNorm2d(child.weight.numel(), eps=child.eps))


class QuantizableDetectorMixin:
    """``fuse_model`` and ``head_outputs`` for single-stage detectors (RetinaNet, FCOS, SSD, SSDLite)."""

    def match_checkpoint(self, state_dict: dict[str, Tensor]) -> None:
        """Called by qz's strict loader: a BatchNorm2d checkpoint keeps BatchNorm2d (``match_norm_to_checkpoint``)."""
        match_norm_to_checkpoint(self, state_dict)

    backbone_scopes: tuple[str, ...] = ("backbone.body",)
    neck_and_head_scopes: tuple[str, ...] = ("backbone.fpn", "head")

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-relu): ``level='blocks'`` in the backbone only, ``'all'`` in neck and heads too."""
        if check_fuse_level(level) == "none":
            return
        scopes = self.backbone_scopes + (self.neck_and_head_scopes if level == "all" else ())
        fuse_detector(self, scopes, is_qat)

    def head_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """The raw (float, dequantized) head outputs for a batch of images, before any decoding."""
        image_list, _ = self.transform(list(images))
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return dict(self.head(list(features.values())))

    def detection_inputs(self, images: Sequence[Tensor]) -> list[Tensor]:
        """A list of CHW images of any size (the detector normalizes and resizes inside)."""
        return list(images)

    def detection_loss(self, images: Tensor | list[Tensor], targets: Sequence[Target]) -> Tensor:
        """The sum of torchvision's loss dict; labels are category ids (0 is the background)."""
        images = list(images)
        own = [
            {
                "boxes": scale_boxes(t["boxes"].float(), t["image_size"], tuple(x.shape[-2:])),
                "labels": t["category_ids"],
            }
            for x, t in zip(images, targets, strict=True)
        ]
        return detection_loss_sum(self(images, own))

    def detect(self, images: Tensor | list[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Detection]:
        """torchvision's detections, boxes mapped from the transformed images back to the original ones."""
        images = list(images)
        outputs = self(images)
        return [
            {
                "boxes": scale_boxes(out["boxes"], tuple(x.shape[-2:]), size),
                "labels": out["labels"],
                "scores": out["scores"],
            }
            for x, out, size in zip(images, outputs, image_sizes, strict=True)
        ]

    def export_module(self) -> nn.Module:
        """``DenseDetector``: images in, raw head outputs out."""
        return DenseDetector(self)

    @torch.no_grad()
    def settle_random_weights(self, inputs: Sequence[Any]) -> None:
        """He-init every conv (torchvision's heads start near zero), then BatchNorm statistics from ``inputs``.

        With random BatchNorm statistics activations blow up; the statistics are re-estimated on the
        images as the detector's transform normalizes and resizes them, flipped too.
        """
        he_reinit(self)
        self.eval()
        batches = []
        for batch in inputs:
            images = self.transform(list(batch))[0].tensors
            batches.append(torch.cat([images, images.flip(-1)]))
        estimate_bn_stats(self.backbone, batches)


# --- The detector protocol and the one builder path -------------------------------------------


class DenseDetector(nn.Module):
    """The network part of a detector for ONNX: images in, raw head outputs (a tuple of tensors) out.

    Anchors, box decoding and NMS stay with the caller, in float, as in most INT8 deployments.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.detector.head_outputs(images).values())


@torch.no_grad()
def he_reinit(model: nn.Module, seed: int = 0) -> None:
    """Re-initializes every conv and linear He-style with small random biases (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(1.0 / fan_in))
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def detection_loss_sum(losses: Any) -> Tensor:
    """torchvision's training objective: the sum of the detector's loss dict."""
    if not isinstance(losses, dict) or not losses:
        raise QzError("A detector in train mode must return its loss dict: call it with (images, targets).")
    return sum(losses.values())


def torchvision_detector_kwargs(context: BuildContext, kwargs: dict[str, Any]) -> None:
    """``adjust_kwargs`` of torchvision detectors: the resolved weights pick FrozenBatchNorm2d, as in torchvision.

    Given full weights, ``weights_backbone`` is dropped (the full weights overwrite the backbone anyway).
    """
    kwargs["weights"] = context.source
    kwargs["progress"] = context.progress
    kwargs["weights_backbone"] = None if context.source is not None else kwargs.get("weights_backbone")
    kwargs.setdefault("trainable_backbone_layers", None)


def detector_spec(
    name: str, family: str, make_model: Callable[..., nn.Module], weights_enum: type[WeightsEnum], **fields: Any
) -> ModelSpec:
    """The spec fields every torchvision detector shares; a family module varies it with ``variant``."""
    return ModelSpec(
        name=name,
        task="detection",
        family=family,
        make_model=make_model,
        weights_enum=weights_enum,
        adjust_kwargs=torchvision_detector_kwargs,
        transient_kwargs=TRANSIENT_KWARGS,
        deployed_ratio_target=DEPLOYED_RATIO_TARGET,
        **fields,
    )
