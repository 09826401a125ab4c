"""Quantizable GoogLeNet (Inception v1), built on torchvision's quantizable blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import GoogLeNet_Weights
from torchvision.models.quantization.googlenet import (
    QuantizableBasicConv2d,
    QuantizableInceptionAux,
)
from torchvision.models.quantization.googlenet import QuantizableGoogLeNet as _TvQuantizableGoogLeNet

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import BuildContext, ModelSpec, define_model, fuse_modules

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
    qz's builder loads after ``make_model``, so qz drops them from a load_state_dict post-hook (before
    fusion and prepare).
    """

    def hook(module: nn.Module, _incompatible: Any) -> None:
        module.aux_logits = False
        for name in names:
            setattr(module, name, None)
        handle.remove()

    handle = model.register_load_state_dict_post_hook(hook)


def torchvision_weights_rules(aux_default: bool) -> Callable[[BuildContext, dict[str, Any]], None]:
    """An ``adjust_kwargs`` hook applying torchvision's rules for its own weights.

    With a torchvision weights member: ``transform_input`` defaults to True, ``init_weights=False``,
    and the auxiliary heads stay only if ``aux_logits`` (default ``aux_default``) asks for them. The
    model is still built with its heads so the checkpoint loads (``load_aux_heads``, not stored in the
    recipe), then drops them. A checkpoint path loads into the model ``kwargs`` describe, as it is.
    """

    def adjust(context: BuildContext, kwargs: dict[str, Any]) -> None:
        if context.source is None or context.source.enum_member is None:
            return
        kwargs.setdefault("transform_input", True)
        kwargs["aux_logits"] = kwargs.get("aux_logits", aux_default)
        kwargs["init_weights"] = False
        kwargs["load_aux_heads"] = True

    return adjust


def with_aux_heads_for_loading(
    model_class: Callable[..., nn.Module], heads: tuple[str, ...]
) -> Callable[..., nn.Module]:
    """A ``make_model`` that builds ``model_class`` with its auxiliary heads when ``load_aux_heads``.

    Without ``aux_logits`` the heads are dropped once the checkpoint has loaded into them.
    """

    def make_model(*, load_aux_heads: bool = False, **kwargs: Any) -> nn.Module:
        keep = kwargs.pop("aux_logits", True)
        model = model_class(aux_logits=keep or load_aux_heads, **kwargs)
        if load_aux_heads and not keep:
            drop_aux_after_load(model, heads)
        return model

    return make_model


googlenet = define_model(
    ModelSpec(
        name="googlenet",
        task=TASK,
        family="googlenet",
        make_model=with_aux_heads_for_loading(QuantizableGoogLeNet, ("aux1", "aux2")),
        weights_enum=GoogLeNet_Weights,
        adjust_kwargs=torchvision_weights_rules(aux_default=False),
        transient_kwargs=("load_aux_heads",),
        preprocess=imagenet_preprocess((224, 224)),
        deployed_ratio_target=ratio_target("googlenet"),
        description="torchvision's GoogLeNet architecture; with torchvision weights, ``transform_input`` "
        "defaults to True and the untrained auxiliary heads are dropped unless ``aux_logits=True``",
    )
)
