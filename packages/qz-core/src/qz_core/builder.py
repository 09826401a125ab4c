"""The one builder sequence of qz: load weights, eval, fuse, then qconfig and prepare."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.ao.quantization as tq
from torch import nn
from torchvision.models import WeightsEnum

from qz_core.backend import resolve_backend, set_backend
from qz_core.errors import QzError
from qz_core.fusion import check_fuse_level
from qz_core.partial import keep_float, quantize_from
from qz_core.qconfig import make_qconfig
from qz_core.weights import load_state_dict_strict, resolve_weights

WeightsArg = WeightsEnum | str | os.PathLike | None


@dataclass
class QuantOptions:
    """Quantization keywords every qz builder accepts besides the model's own.

    Attributes:
        backend: quantized engine ('x86', 'qnnpack', ...); the platform's when None.
        fuse_level: 'all', 'blocks' (residual blocks only) or 'none'.
        activation_observer: activation observer name or None for the backend default.
        weight_observer: weight observer name or None for the backend default.
        reduce_range: 7-bit activations; None for the backend default.
        allow_saturation: accept full-range activations on x86 (warns instead of raising).
        float_modules: dotted names of submodules kept in float behind DeQuant/Quant stubs.
        quantize_from: dotted name of the stage where quantization starts; all before stays float.
    """

    backend: str | None = None
    fuse_level: str = "all"
    activation_observer: str | None = None
    weight_observer: str | None = None
    reduce_range: bool | None = None
    allow_saturation: bool = False
    float_modules: Sequence[str] = field(default_factory=tuple)
    quantize_from: str | None = None

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> QuantOptions:
        """Takes this class's keys out of ``kwargs`` (leaving the model's own)."""
        names = cls.__dataclass_fields__
        options = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        options.float_modules = tuple(options.float_modules)
        check_fuse_level(options.fuse_level)
        return options


def prepare_quantizable(
    model: nn.Module,
    *,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    options: QuantOptions,
) -> nn.Module:
    """Runs eval, fuse (unless ``skip_fuse``), then qconfig and prepare/prepare_qat on ``model``.

    Fusion is a quantization step: with ``quantize=False`` nothing is fused or prepared, so the
    model computes exactly what the float model computes. The model must define
    ``fuse_model(is_qat, level)``.
    """
    if is_qat and not quantize:
        raise QzError("is_qat=True needs quantize=True: QAT is a way to quantize.")
    model.eval()
    backend = resolve_backend(options.backend)
    if quantize and not skip_fuse and options.fuse_level != "none":
        model.fuse_model(is_qat=is_qat, level=options.fuse_level)
    if quantize:
        set_backend(backend)
        qconfig = make_qconfig(
            backend,
            is_qat=is_qat,
            activation=options.activation_observer,
            weight=options.weight_observer,
            reduce_range=options.reduce_range,
            allow_saturation=options.allow_saturation,
        )
        keep_float(model, options.float_modules)
        if options.quantize_from:
            quantize_from(model, options.quantize_from)
        model.qconfig = qconfig
        if is_qat:
            model.train()
            tq.prepare_qat(model, inplace=True)
        else:
            tq.prepare(model, inplace=True)
    return model


def build_quantizable(
    make_model: Callable[..., nn.Module],
    *,
    weights: WeightsArg,
    weights_enum: type[WeightsEnum] | None,
    progress: bool,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    set_num_classes: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Builds a quantizable model the qz way, for a family's private ``_x`` builder.

    Args:
        make_model: constructs the (unfused, float) quantizable model from keyword arguments.
        weights: None, a weights enum member or name, or a local checkpoint path.
        weights_enum: the model's torchvision weights enum (for names and metadata).
        progress: show a download progress bar.
        quantize: prepare for quantization (PTQ, or QAT with ``is_qat``).
        is_qat: prepare for quantization-aware training.
        skip_fuse: leave fusion to the caller (a detector fusing its backbone itself).
        set_num_classes: take ``num_classes`` from the weights' categories.
        **kwargs: ``QuantOptions`` fields and the model constructor's own arguments.
    """
    options = QuantOptions.pop_from(kwargs)
    source = resolve_weights(weights, weights_enum)
    if source is not None and set_num_classes and source.meta.get("categories") is not None:
        expected = len(source.meta["categories"])
        given = kwargs.setdefault("num_classes", expected)
        if given != expected:
            raise QzError(f"num_classes={given} does not match weights {source.label} ({expected} categories).")
    model = make_model(**kwargs)
    if source is not None:
        load_state_dict_strict(model, source.state_dict(progress=progress), source.label)
    prepare_quantizable(model, quantize=quantize, is_qat=is_qat, skip_fuse=skip_fuse, options=options)
    model.qz_recipe = {
        "name": None,
        "model_kwargs": kwargs,
        "quantize": quantize,
        "is_qat": is_qat,
        "skip_fuse": skip_fuse,
        "options": asdict(options) | {"backend": resolve_backend(options.backend)},
    }
    return model
