"""Quantizable Inception v3, built on torchvision's quantizable blocks."""

from __future__ import annotations

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

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_classification.models.googlenet import torchvision_weights_rules, with_aux_heads_for_loading
from qz_core import ModelSpec, define_model, fuse_modules

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


inception_v3 = define_model(
    ModelSpec(
        name="inception_v3",
        task=TASK,
        family="inception",
        make_model=with_aux_heads_for_loading(QuantizableInception3, ("AuxLogits",)),
        weights_enum=tv.Inception_V3_Weights,
        input_size=(299, 299),
        adjust_kwargs=torchvision_weights_rules(aux_default=True),
        transient_kwargs=("load_aux_heads",),
        preprocess=imagenet_preprocess((299, 299)),
        deployed_ratio_target=ratio_target("inception"),
        description="torchvision's Inception3 architecture; with torchvision weights, ``transform_input`` "
        "defaults to True and the auxiliary head is kept unless ``aux_logits=False``",
    )
)
