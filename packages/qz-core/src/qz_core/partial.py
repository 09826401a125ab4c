"""Partial quantization: parts of a model kept in float behind DeQuant/Quant stubs."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qz_core.errors import invalid_choice


class FloatIsland(nn.Module):
    """Runs ``module`` in float inside a quantized model: dequantize, run, quantize again."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.module = module
        self.quant = QuantStub()
        self.module.qconfig = None

    def forward(self, *args: Tensor) -> Tensor:
        return self.quant(self.module(*(self.dequant(a) for a in args)))


class QuantEntry(nn.Module):
    """Quantizes the input of ``module``: where a model that starts in float becomes INT8."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(self.quant(x))


def _get(model: nn.Module, dotted: str, option: str) -> nn.Module:
    names = dict(model.named_modules())
    if dotted not in names or not dotted:
        choices = [n for n, m in model.named_children()] + [n for n in names if n.count(".") == 1]
        raise invalid_choice(f"{option} module", dotted, choices)
    return names[dotted]


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def keep_float(model: nn.Module, names: Iterable[str]) -> None:
    """Wraps each named submodule in a ``FloatIsland`` (call before ``prepare``)."""
    for name in names:
        _replace(model, name, FloatIsland(_get(model, name, "float_modules")))


def quantize_from(model: nn.Module, stage: str) -> None:
    """Keeps everything registered before ``stage`` in float and quantizes from ``stage`` on.

    The model's own top-level QuantStub stays float (an identity); a new one sits in front of
    ``stage``. Modules run in their registration order, as in torchvision's models.
    """
    target = _get(model, stage, "quantize_from")
    for child in model.children():
        if isinstance(child, QuantStub):
            child.qconfig = None
    parts = stage.split(".")
    parent = model
    for part in parts:
        for name, child in parent.named_children():
            if name == part:
                break
            if not isinstance(child, (QuantStub, DeQuantStub)):
                child.qconfig = None
        parent = parent.get_submodule(part)
    _replace(model, stage, QuantEntry(target))


def count_float_islands(model: nn.Module) -> int:
    """How many DeQuant -> float -> Quant islands a (prepared or converted) model keeps.

    Counts ``FloatIsland`` wrappers, plus what modules that run part of their own forward in float
    between their own stubs declare in a ``qz_float_islands`` attribute (a float normalization, an
    RoIAlign), so no float part of a model goes unreported.
    """
    return sum(isinstance(m, FloatIsland) + int(getattr(m, "qz_float_islands", 0)) for m in model.modules())
