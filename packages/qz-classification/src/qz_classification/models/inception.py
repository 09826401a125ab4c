"""Quantizable Inception v3, built on torchvision's quantizable blocks."""

from __future__ import annotations

from typing import Any

from torchvision.models import inception as tv
from torchvision.models.quantization.inception import (
    QuantizableBasicConv2d,
    QuantizableInceptionA,
    QuantizableInceptionB,
    QuantizableInceptionC,
    QuantizableInceptionD,
    QuantizableInceptionE,
)
from torchvision.models.quantization.inception import QuantizableInception3 as _TvQuantizableInception3

from qz_classification._registry import register_classifier
from qz_classification.models.googlenet import drop_aux_after_load, pretrained_kwargs
from qz_core import build_quantizable, fuse_modules
from qz_core.builder import WeightsArg

__all__ = ["QuantizableInception3", "inception_v3"]

_BLOCKS = (
    QuantizableInceptionA,
    QuantizableInceptionB,
    QuantizableInceptionC,
    QuantizableInceptionD,
    QuantizableInceptionE,
)


class QuantizableInception3(_TvQuantizableInception3):
    """torchvision's quantizable Inception3 with qz's ``fuse_model(is_qat, level)``.

    In eval mode the output is the logits tensor; in training mode with ``aux_logits`` it is
    torchvision's ``InceptionOutputs(logits, aux_logits)``. ``transform_input`` runs in float
    before the QuantStub.
    """

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn-relu in the Inception blocks; with ``level='all'`` also the stem and aux head."""
        blocks = [name for name, m in self.named_modules() if isinstance(m, _BLOCKS)]
        groups = []
        for name, module in self.named_modules():
            inside_block = any(name.startswith(f"{b}.") for b in blocks)
            if type(module) is QuantizableBasicConv2d and (inside_block or level == "all"):
                groups.append([f"{name}.conv", f"{name}.bn", f"{name}.relu"])
        fuse_modules(self, groups, is_qat)


@register_classifier("inception_v3", tv.Inception_V3_Weights, family="inception", input_size=(299, 299))
def inception_v3(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    quantize: bool = False,
    is_qat: bool = False,
    skip_fuse: bool = False,
    **kwargs: Any,
) -> QuantizableInception3:
    """Quantizable inception_v3 (torchvision architecture, weights ``Inception_V3_Weights``).

    As torchvision's builder: with torchvision weights, ``transform_input`` defaults to True and
    the auxiliary head is kept unless ``aux_logits=False``.

    Args:
        weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.
        progress: show a download progress bar.
        quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
        is_qat: prepare for quantization-aware training.
        skip_fuse: leave fusion to the caller.
        **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``Inception3`` arguments.
    """
    keep_aux = pretrained_kwargs(weights, tv.Inception_V3_Weights, kwargs, aux_default=True)

    def make_model(**kw: Any) -> QuantizableInception3:
        model = QuantizableInception3(**kw)
        if not keep_aux:
            drop_aux_after_load(model, ("AuxLogits",))
        return model

    model = build_quantizable(
        make_model,
        weights=weights,
        weights_enum=tv.Inception_V3_Weights,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )
    # The recipe rebuilds the model without weights: it must describe the model as it is now.
    model.qz_recipe["model_kwargs"]["aux_logits"] = model.aux_logits
    return model
