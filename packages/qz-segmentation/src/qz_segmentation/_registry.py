"""How segmentation families register their builders with qz-core: transforms, QAT loss, builder factory."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import WeightsEnum

from qz_core import QzError, build_quantizable, register_model, resolve_weights
from qz_core.builder import WeightsArg

# torchvision's evaluation size for its segmentation weights (``SemanticSegmentation(resize_size=520)``
# resizes the shorter side to 520); a square 520x520 input stands for it in benchmarks.
SEGMENTATION_INPUT_SIZE = (520, 520)
# Deployed INT8/FP32 latency ratio every segmenter must reach in ``qz bench`` (the whole model).
DEPLOYED_RATIO_TARGET = 0.4
# Pascal VOC marks object borders and unlabelled pixels with 255.
IGNORE_INDEX = 255
FAMILIES = ("fcn", "deeplabv3", "lraspp")


class SegmentationLoss(nn.Module):
    """Per-pixel cross-entropy of torchvision's segmentation recipe: ``out`` plus 0.5 x ``aux``.

    Takes the model's output (an ``OrderedDict`` with ``"out"`` and maybe ``"aux"``, or a bare
    logits tensor) and integer masks ``(N, H, W)`` in which ``ignore_index`` pixels do not count.
    """

    def __init__(self, aux_weight: float = 0.5, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    def forward(self, output: Mapping[str, Tensor] | Tensor, target: Tensor) -> Tensor:
        if isinstance(output, Tensor):
            output = {"out": output}
        if "out" not in output:
            raise QzError(f"SegmentationLoss needs an 'out' entry in the model output; got {sorted(output)}.")
        target = target.long()
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        loss = F.cross_entropy(output["out"], target, ignore_index=self.ignore_index)
        if "aux" in output and self.aux_weight:
            loss = loss + self.aux_weight * F.cross_entropy(output["aux"], target, ignore_index=self.ignore_index)
        return loss


_BUILDER_DOC = """Quantizable {name} (torchvision architecture, weights ``{weights}``).

Args:
    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.
        Enum weights turn ``aux_loss`` on, as in torchvision (their checkpoints hold the aux head).
    progress: show a download progress bar.
    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
    is_qat: prepare for quantization-aware training.
    skip_fuse: leave fusion to the caller.
    **kwargs: ``qz_core.QuantOptions`` fields and torchvision's ``{name}`` arguments: ``num_classes``
        (21), {aux}``weights_backbone`` (None here: torchvision's default would download ImageNet
        weights; pass ``'DEFAULT'`` for them).
"""


def define_segmenter(
    name: str,
    weights_enum: type[WeightsEnum],
    family: str,
    make_model: Callable[..., nn.Module],
    *,
    has_aux: bool = True,
) -> Callable[..., nn.Module]:
    """Defines and registers the public builder ``name`` with the seed signature.

    Args:
        make_model: builds the unfused quantizable model from ``num_classes``, ``weights_backbone``
            (and ``aux_loss`` where ``has_aux``).
        has_aux: the architecture has an auxiliary classifier (LRASPP has none).
    """

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        source = resolve_weights(weights, weights_enum)
        from_enum = source is not None and source.enum_member is not None
        if has_aux and from_enum and kwargs.setdefault("aux_loss", True) is not True:
            raise QzError(f"{name} weights {source.label} hold an aux classifier: aux_loss must be True.")
        if not has_aux and kwargs.pop("aux_loss", None):
            raise QzError(f"{name} has no auxiliary classifier: aux_loss must be False or left out.")
        if source is not None:
            kwargs["weights_backbone"] = None  # the full checkpoint overwrites the backbone anyway
        model = build_quantizable(
            make_model,
            weights=weights,
            weights_enum=weights_enum,
            progress=progress,
            quantize=quantize,
            is_qat=is_qat,
            skip_fuse=skip_fuse,
            **kwargs,
        )
        # An INT8 file holds every weight: rebuilding it (load_quantized) needs no backbone weights.
        model.qz_recipe["model_kwargs"].pop("weights_backbone", None)
        return model

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _BUILDER_DOC.format(
        name=name, weights=weights_enum.__name__, aux="``aux_loss`` (False), " if has_aux else ""
    )
    return register_model(
        name,
        task="segmentation",
        weights=weights_enum,
        input_size=SEGMENTATION_INPUT_SIZE,
        family=family,
        deployed_ratio_target=DEPLOYED_RATIO_TARGET,
        default_transforms=lambda: weights_enum.DEFAULT.transforms(),
        qat_loss=SegmentationLoss,
    )(builder)


def check_num_classes(num_classes: int) -> int:
    """Returns ``num_classes`` if it is a positive integer, else raises."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise QzError(f"num_classes must be a positive integer; got {num_classes!r}.")
    return num_classes
