"""Quantizable MNASNet (B1 variant, depth multipliers 0.5, 0.75, 1.0 and 1.3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import mnasnet as tv
from torchvision.models.mnasnet import MNASNet, _InvertedResidual

from qz_classification._registry import register_classifier
from qz_core import build_quantizable, fuse_in_blocks
from qz_core.builder import WeightsArg

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
        return self.dequant(super().forward(self.quant(x)))

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


def _mnasnet(
    alpha: float,
    weights_enum: type[tv.WeightsEnum],
    weights: WeightsArg,
    progress: bool,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    **kwargs: Any,
) -> QuantizableMNASNet:
    return build_quantizable(
        lambda **kw: QuantizableMNASNet(alpha, **kw),
        weights=weights,
        weights_enum=weights_enum,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )


def _variant(name: str, alpha: float, weights_enum: type[tv.WeightsEnum]):
    """Defines and registers the public builder ``name`` with the seed signature."""

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> QuantizableMNASNet:
        return _mnasnet(alpha, weights_enum, weights, progress, quantize, is_qat, skip_fuse, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"Quantizable {name}, depth multiplier {alpha} (torchvision architecture, weights "
        f"``{weights_enum.__name__}``).\n\n"
        "Args:\n"
        "    weights: None, a weights enum member or name (``'DEFAULT'``), or a checkpoint path.\n"
        "    progress: show a download progress bar.\n"
        "    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).\n"
        "    is_qat: prepare for quantization-aware training.\n"
        "    skip_fuse: leave fusion to the caller.\n"
        "    **kwargs: ``qz_core.QuantOptions`` fields and torchvision ``MNASNet`` arguments "
        "(``num_classes``, ``dropout``).\n"
    )
    return register_classifier(name, weights_enum, family="mnasnet")(builder)


mnasnet0_5 = _variant("mnasnet0_5", 0.5, tv.MNASNet0_5_Weights)
mnasnet0_75 = _variant("mnasnet0_75", 0.75, tv.MNASNet0_75_Weights)
mnasnet1_0 = _variant("mnasnet1_0", 1.0, tv.MNASNet1_0_Weights)
mnasnet1_3 = _variant("mnasnet1_3", 1.3, tv.MNASNet1_3_Weights)
