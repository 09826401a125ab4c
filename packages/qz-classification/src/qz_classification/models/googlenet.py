"""Quantizable GoogLeNet (Inception v1), built on torchvision's quantizable blocks."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import GoogLeNet_Weights
from torchvision.models.quantization.googlenet import (
    QuantizableBasicConv2d,
    QuantizableInceptionAux,
)
from torchvision.models.quantization.googlenet import QuantizableGoogLeNet as _TvQuantizableGoogLeNet

from qz_classification._registry import register_classifier
from qz_core import build_quantizable, fuse_modules, resolve_weights
from qz_core.builder import WeightsArg

__all__ = ["QuantizableGoogLeNet", "drop_aux_after_load", "googlenet"]


class QuantizableGoogLeNet(_TvQuantizableGoogLeNet):
    """torchvision's quantizable GoogLeNet with qz's ``fuse_model(is_qat, level)``.

    In eval mode the output is the logits tensor; in training mode with ``aux_logits`` it is
    torchvision's ``GoogLeNetOutputs(logits, aux2, aux1)``. ``transform_input`` runs in float
    before the QuantStub.
    """

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn-relu in the Inception blocks; with ``level='all'`` also the stem and aux heads."""
        groups = []
        for name, module in self.named_modules():
            inside_block = name.startswith("inception")
            if type(module) is QuantizableBasicConv2d and (inside_block or level == "all"):
                groups.append([f"{name}.conv", f"{name}.bn", f"{name}.relu"])
            elif isinstance(module, QuantizableInceptionAux) and level == "all":
                groups.append([f"{name}.fc1", f"{name}.relu"])
        fuse_modules(self, groups, is_qat)


def drop_aux_after_load(model: nn.Module, names: tuple[str, ...]) -> None:
    """Removes the auxiliary heads ``names`` once the next ``load_state_dict`` has filled them.

    torchvision builds pretrained GoogLeNet and Inception v3 with their auxiliary heads (the
    checkpoints hold them), loads, then drops the heads unless ``aux_logits=True`` was asked for.
    ``build_quantizable`` loads inside, so qz drops them from a load_state_dict post-hook (before
    fusion and prepare).
    """

    def hook(module: nn.Module, _incompatible: Any) -> None:
        module.aux_logits = False
        for name in names:
            setattr(module, name, None)
        handle.remove()

    handle = model.register_load_state_dict_post_hook(hook)


def pretrained_kwargs(weights: WeightsArg, weights_enum: type, kwargs: dict[str, Any], aux_default: bool) -> bool:
    """Applies torchvision's rules for its own weights to ``kwargs``; returns whether aux heads stay.

    With a torchvision weights member: ``transform_input`` defaults to True, the model is built
    with its auxiliary heads (to load them) and ``init_weights=False``. A checkpoint path loads
    into the model ``kwargs`` describe, as it is.
    """
    keep_aux = kwargs.get("aux_logits", aux_default)
    source = resolve_weights(weights, weights_enum)
    if source is None or source.enum_member is None:
        return True
    kwargs.setdefault("transform_input", True)
    kwargs["aux_logits"] = True
    kwargs["init_weights"] = False
    return keep_aux


@register_classifier("googlenet", GoogLeNet_Weights, family="googlenet")
def googlenet(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    quantize: bool = False,
    is_qat: bool = False,
    skip_fuse: bool = False,
    **kwargs: Any,
) -> QuantizableGoogLeNet:
    """Quantizable googlenet (torchvision architecture, weights ``GoogLeNet_Weights``).

    As torchvision's builder: with torchvision weights, ``transform_input`` defaults to True and
    the (untrained) auxiliary heads are dropped unless ``aux_logits=True``.

    Args:
        weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.
        progress: show a download progress bar.
        quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
        is_qat: prepare for quantization-aware training.
        skip_fuse: leave fusion to the caller.
        **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``GoogLeNet`` arguments.
    """
    keep_aux = pretrained_kwargs(weights, GoogLeNet_Weights, kwargs, aux_default=False)

    def make_model(**kw: Any) -> QuantizableGoogLeNet:
        model = QuantizableGoogLeNet(**kw)
        if not keep_aux:
            drop_aux_after_load(model, ("aux1", "aux2"))
        return model

    model = build_quantizable(
        make_model,
        weights=weights,
        weights_enum=GoogLeNet_Weights,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )
    # The recipe rebuilds the model without weights: it must describe the model as it is now.
    model.qz_recipe["model_kwargs"]["aux_logits"] = model.aux_logits
    return model
