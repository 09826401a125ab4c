"""Fusion of conv-bn(-relu) and linear-relu patterns, PTQ or QAT, at a chosen granularity."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.intrinsic import _FusedModule

from qz_core.errors import invalid_choice

FuseLevel = Literal["none", "blocks", "all"]
FUSE_LEVELS: tuple[str, ...] = ("none", "blocks", "all")

# Longest patterns first; torch's fuser knows each of these for PTQ and QAT.
_PATTERNS: tuple[tuple[type[nn.Module], ...], ...] = (
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.ReLU),
    (nn.Conv1d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.Linear, nn.ReLU),
    (nn.BatchNorm2d, nn.ReLU),
)


RELU6_MODES: tuple[str, ...] = ("clamp", "exact", "relu")
# Set on each conv-bn-ReLU6 Sequential whose ReLU6 fusion turned into a ReLU: the name of the ReLU6's slot.
RELU6_SLOT_ATTR = "qz_relu6_slot"


def relu6_to_relu(module: nn.Module) -> int:
    """Replaces the ReLU6 of every conv-bn-ReLU6 Sequential in ``module`` by a ReLU, so the run can fuse.

    torch has no fused conv-bn-ReLU6. Each such Sequential is marked (``qz_relu6_slot``) so that, unless
    ``QuantOptions.relu6='relu'``, ``qz_core.qconfig.keep_relu6`` makes the INT8 model compute ReLU6 again.
    Only called when fusing: an unquantized model keeps ReLU6 and computes exactly the float model's output.

    Returns:
        The number of ReLU6 replaced.
    """
    count = 0
    for child in module.modules():
        if isinstance(child, nn.Sequential) and [type(m) for m in child] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]:
            child[2] = nn.ReLU(inplace=False)
            setattr(child, RELU6_SLOT_ATTR, "2")
            count += 1
    return count


def check_fuse_level(level: str) -> str:
    """Returns ``level`` if it is one of ``FUSE_LEVELS``, else raises naming the choices."""
    if level not in FUSE_LEVELS:
        raise invalid_choice("fuse level", level, FUSE_LEVELS)
    return level


def fuse_modules(module: nn.Module, groups: Sequence[Sequence[str]], is_qat: bool) -> None:
    """Fuses each group of dotted submodule names in place, with the QAT fuser when ``is_qat``.

    The QAT fuser keeps BatchNorm trainable and needs the modules in training mode; the PTQ
    fuser folds BatchNorm into the conv and needs eval mode. qz sets each mode as it fuses.
    """
    groups = [list(g) for g in groups if g]
    if not groups:
        return
    was_training = module.training
    module.train(is_qat)
    if is_qat:
        tq.fuse_modules_qat(module, groups, inplace=True)
    else:
        tq.fuse_modules(module, groups, inplace=True)
    module.train(was_training)


def _type_matches(mod: nn.Module, kind: type[nn.Module]) -> bool:
    # Exact types: a subclass (ReLU6 is not ReLU, a quantizable block is not a Conv2d) never fuses.
    return type(mod) is kind


def sequential_fusion_groups(module: nn.Module, prefix: str = "") -> list[list[str]]:
    """Finds fusable runs (conv-bn-relu, conv-bn, linear-relu, ...) inside every nn.Sequential."""
    groups: list[list[str]] = []
    fused = [n for n, m in module.named_modules(prefix=prefix) if isinstance(m, _FusedModule)]
    for name, child in module.named_modules(prefix=prefix):
        # Already-fused intrinsic modules are Sequentials too: never look inside them.
        if not isinstance(child, nn.Sequential) or any(name == f or name.startswith(f + ".") for f in fused):
            continue
        items = list(child.named_children())
        i = 0
        while i < len(items):
            for pattern in _PATTERNS:
                run = items[i : i + len(pattern)]
                if len(run) == len(pattern) and all(
                    _type_matches(m, k) for (_, m), k in zip(run, pattern, strict=True)
                ):
                    groups.append([f"{name}.{n}" if name else n for n, _ in run])
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups


def fuse_in_blocks(
    model: nn.Module,
    block_types: type[nn.Module] | tuple[type[nn.Module], ...],
    level: str,
    is_qat: bool,
    prepare_scope: Callable[[nn.Module], None] | None = None,
) -> None:
    """Fuses the nn.Sequential runs inside ``block_types`` ('blocks') or anywhere in ``model`` ('all').

    Args:
        prepare_scope: called on each scope before its groups are found (e.g. ReLU6 -> ReLU).
    """
    if check_fuse_level(level) == "none":
        return
    if level == "all":
        scopes = [("", model)]
    else:
        scopes = [(n, m) for n, m in model.named_modules() if isinstance(m, block_types)]
    groups = []
    for name, scope in scopes:
        if prepare_scope is not None:
            prepare_scope(scope)
        groups += sequential_fusion_groups(scope, prefix=name)
    fuse_modules(model, groups, is_qat)


def fuse_sequentials(module: nn.Module, is_qat: bool) -> int:
    """Fuses every known pattern found in the nn.Sequential containers of ``module``.

    Returns:
        The number of groups fused.
    """
    groups = sequential_fusion_groups(module)
    fuse_modules(module, groups, is_qat)
    return len(groups)
