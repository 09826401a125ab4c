"""Quantizable stand-ins for float layers that have no INT8 kernel of their own."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torchvision.ops.misc import SqueezeExcitation


class QuantizableSiLU(nn.Module):
    """SiLU that becomes ``x * sigmoid(x)`` (INT8 sigmoid and multiply) once prepared for quantization.

    Until ``prepare``/``prepare_qat`` replaces the identity ``activation_post_process`` of ``mul``
    with an observer, it calls ``F.silu``, so the float model stays bit-exact with torchvision's.
    TorchScript cannot inspect module types: ``torch.jit.script`` records ``is_float()`` in
    ``scripted_float`` when it compiles the module, and the scripted forward reads that instead.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.sigmoid = nn.Sigmoid()
        self.mul = FloatFunctional()
        self.scripted_float = True

    @torch.jit.unused
    def is_float(self) -> bool:
        """True until the module is prepared (observed or fake-quantized) or converted."""
        return type(self.mul) is FloatFunctional and type(self.mul.activation_post_process) is nn.Identity

    def __prepare_scriptable__(self) -> QuantizableSiLU:
        """Called by ``torch.jit.script``: records which forward the scripted module runs."""
        self.scripted_float = self.is_float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        use_float = self.scripted_float if torch.jit.is_scripting() else self.is_float()
        if use_float:
            return F.silu(x, inplace=self.inplace)
        return self.mul.mul(x, self.sigmoid(x))


def replace_silu(module: nn.Module) -> None:
    """Swaps every ``nn.SiLU`` below ``module`` for ``QuantizableSiLU`` (SiLU holds no state)."""
    for name, child in module.named_children():
        if type(child) is nn.SiLU:
            setattr(module, name, QuantizableSiLU(inplace=child.inplace))
        else:
            replace_silu(child)


class QuantizableSqueezeExcitation(SqueezeExcitation):
    """torchvision's squeeze-excitation whose channel scaling multiplies through ``FloatFunctional``.

    Its scale activation (sigmoid, hardsigmoid) has an INT8 kernel; ``scale * input`` does not.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_mul = FloatFunctional()

    def forward(self, input: Tensor) -> Tensor:
        return self.skip_mul.mul(self._scale(input), input)

    def fusion_groups(self) -> list[list[str]]:
        """The squeeze conv and its ReLU (``fc1``, ``activation``) fuse into one ConvReLU2d."""
        return [["fc1", "activation"]] if type(self.activation) is nn.ReLU else []
