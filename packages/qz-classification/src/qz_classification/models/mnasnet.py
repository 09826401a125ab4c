"""Quantizable MNASNet (B1 variant, depth multipliers 0.5, 0.75, 1.0 and 1.3)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import mnasnet as tv
from torchvision.models.mnasnet import MNASNet, _InvertedResidual

from qz_classification._common import TASK, imagenet_preprocess, ratio_target
from qz_core import ModelSpec, define_model, fuse_in_blocks

__all__ = [
    "QuantizableInvertedResidual",
    "QuantizableMNASNet",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
]


class QuantizableInvertedResidual(_InvertedResidual):
    """MNASNet's inverted residual, adopting a float block's layers, with a ``FloatFunctional`` add."""

    __constants__ = ["apply_residual"]  # a TorchScript constant: only blocks that add compile the add

    def __init__(self, block: _InvertedResidual) -> None:
        # torchvision builds its blocks in a module-level _stack(); qz adopts them as they are
        # (same submodules, same weights, same state_dict keys) instead of building new ones.
        nn.Module.__init__(self)
        self.apply_residual = block.apply_residual
        self.layers = block.layers
        if self.apply_residual:
            self.skip_add = FloatFunctional()

    def forward(self, input: Tensor) -> Tensor:
        if self.apply_residual:
            return self.skip_add.add(self.layers(input), input)
        return self.layers(input)


def _adopt_blocks(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is _InvertedResidual:
            setattr(module, name, QuantizableInvertedResidual(child))
        else:
            _adopt_blocks(child)


class QuantizableMNASNet(MNASNet):
    """torchvision's MNASNet between a QuantStub and a DeQuantStub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _adopt_blocks(self.layers)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.quant(x))
        return self.dequant(self.classifier(x.mean([2, 3])))

    def match_checkpoint(self, state_dict: Mapping[str, Any]) -> bool:
        """Switches to the version-1 stem when ``state_dict`` is a version-1 checkpoint.

        torchvision's older MNASNet checkpoints (alpha != 1.0, saved before the stem scaled with
        alpha) keep a 32-16 channel stem; torchvision switches while loading. Call this before a
        strict key and shape check. Returns True when the stem was switched.
        """
        metadata = getattr(state_dict, "_metadata", {}).get("", {})
        if metadata.get("version") != 1 or self.alpha == 1.0 or self._version == 1:
            return False
        self._load_from_state_dict({}, "", {"version": 1}, False, [], [], [])
        return True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:
        # Workaround: qz_core.read_checkpoint returns a plain dict without torch's _metadata, and
        # torchvision's MNASNet refuses a checkpoint without a version. Without one, the
        # checkpoint is taken to match this model's layout (qz's strict loader checked the shapes).
        if local_metadata.get("version") is None:
            local_metadata = {**local_metadata, "version": self._version}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
        _adopt_blocks(self.layers)  # the version-1 stem torchvision may swap in has plain blocks

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn(-ReLU) in the inverted residuals, and with ``level='all'`` the stem and head too."""
        fuse_in_blocks(self, QuantizableInvertedResidual, level, is_qat)


_BASE = ModelSpec(
    name="mnasnet",
    task=TASK,
    family="mnasnet",
    make_model=partial(QuantizableMNASNet, 1.0),
    preprocess=imagenet_preprocess((224, 224)),
    deployed_ratio_target=ratio_target("mnasnet"),
    description="torchvision's MNASNet architecture (``num_classes``, ``dropout``)",
)

mnasnet0_5 = define_model(
    _BASE.variant(name="mnasnet0_5", make_model=partial(QuantizableMNASNet, 0.5), weights_enum=tv.MNASNet0_5_Weights)
)
mnasnet0_75 = define_model(
    _BASE.variant(name="mnasnet0_75", make_model=partial(QuantizableMNASNet, 0.75), weights_enum=tv.MNASNet0_75_Weights)
)
mnasnet1_0 = define_model(
    _BASE.variant(name="mnasnet1_0", make_model=partial(QuantizableMNASNet, 1.0), weights_enum=tv.MNASNet1_0_Weights)
)
mnasnet1_3 = define_model(
    _BASE.variant(name="mnasnet1_3", make_model=partial(QuantizableMNASNet, 1.3), weights_enum=tv.MNASNet1_3_Weights)
)
