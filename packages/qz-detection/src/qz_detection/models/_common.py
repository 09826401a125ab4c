"""What every quantizable torchvision detector shares: INT8 FPN, dense heads, frozen-BN folding, registration.

The INT8 region runs from the backbone's input (a QuantStub after GeneralizedRCNNTransform) to the
head outputs (DeQuantStubs); anchors, box decoding, NMS and postprocessing stay float, as torchvision
computes them. Quantizable parts are torchvision's own modules whose class is swapped for a subclass
(``upgrade``), so their weights, names and float arithmetic stay exactly torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import WeightsEnum
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from qz_classification.models.mobilenetv2 import relu6_to_relu
from qz_core import build_quantizable, fuse_modules, register_model, sequential_fusion_groups
from qz_core.builder import WeightsArg
from qz_core.fusion import check_fuse_level

# Deployed INT8/FP32 latency ratio qz bench asks of a whole detector (float NMS and decoding included).
DEPLOYED_RATIO_TARGET = 0.4
FAMILIES = ("retinanet", "ssd", "ssdlite", "fcos", "faster_rcnn")

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


# --- Registration -------------------------------------------------------------------------------


def register_detector(
    name: str, weights_enum: type[WeightsEnum], family: str, input_size: tuple[int, int]
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``register_model`` with what every torchvision detector shares.

    Detectors take targets in training and return a loss dict, so they have no ``qat_loss``: QAT runs
    through ``qz_detection.train_qat_detection``.
    """
    return register_model(
        name,
        task="detection",
        weights=weights_enum,
        input_size=input_size,
        family=family,
        deployed_ratio_target=DEPLOYED_RATIO_TARGET,
        default_transforms=lambda: weights_enum.DEFAULT.transforms(),
        qat_loss=None,
        qat_needs_targets=True,
        probe=_probe_detector,
    )


def _probe_detector(name: str, **kwargs: Any) -> Any:
    """``qz_detection.support.probe_detector``, the probe ``qz support`` runs on torchvision detectors."""
    from qz_detection.support import probe_detector

    return probe_detector(name, **kwargs)


_BUILDER_DOC = """Quantizable {name} (torchvision architecture, weights ``{weights}``).

Args:
    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path with
        torchvision's key names. Given weights build the backbone with FrozenBatchNorm2d, as torchvision.
    progress: show a download progress bar.
    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
    is_qat: prepare for quantization-aware training.
    skip_fuse: leave fusion to the caller.
    weights_backbone: backbone weights (enum name or checkpoint) when ``weights`` is None.
    trainable_backbone_layers: backbone stages left trainable (torchvision's default when None).
    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``{architecture}`` arguments
        (``num_classes``, ``min_size``, ``max_size``, ``score_thresh``, ...).
"""


def define_detector(
    name: str,
    weights_enum: type[WeightsEnum],
    family: str,
    input_size: tuple[int, int],
    make_model: Callable[..., nn.Module],
    *,
    architecture: str,
) -> Callable[..., nn.Module]:
    """Defines and registers the public builder ``name``.

    Args:
        make_model: builds the float quantizable detector from ``weights`` (the resolved argument, to
            pick FrozenBatchNorm2d), ``weights_backbone``, ``trainable_backbone_layers``, ``progress``
            and the torchvision constructor's keyword arguments.
    """

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        weights_backbone: WeightsArg = None,
        trainable_backbone_layers: int | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        if weights is not None:
            weights_backbone = None  # as torchvision: full weights overwrite the backbone's anyway

        def make(**kw: Any) -> nn.Module:
            return make_model(
                weights=weights,
                weights_backbone=weights_backbone,
                trainable_backbone_layers=trainable_backbone_layers,
                progress=progress,
                **kw,
            )

        return build_quantizable(
            make,
            weights=weights,
            weights_enum=weights_enum,
            progress=progress,
            quantize=quantize,
            is_qat=is_qat,
            skip_fuse=skip_fuse,
            **kwargs,
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _BUILDER_DOC.format(name=name, weights=weights_enum.__name__, architecture=architecture)
    return register_detector(name, weights_enum, family, input_size)(builder)


def dequantize_all(stub: DeQuantStub, tensors: Iterable[Tensor]) -> list[Tensor]:
    """Runs each tensor through ``stub`` (an identity until convert)."""
    return [stub(t) for t in tensors]
