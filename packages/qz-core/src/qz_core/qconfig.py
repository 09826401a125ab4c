"""Per-backend qconfigs for PTQ and QAT, with observer overrides for studies."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.ao.quantization import (
    FakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    get_default_qat_qconfig,
    get_default_qconfig,
)

from qz_core.backend import resolve_backend
from qz_core.errors import QzError, invalid_choice

ACTIVATION_OBSERVERS: dict[str, type] = {
    "histogram": HistogramObserver,
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
}
WEIGHT_OBSERVERS: dict[str, type] = {
    "histogram": HistogramObserver,
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "per_channel_minmax": PerChannelMinMaxObserver,
    "moving_average_per_channel_minmax": MovingAveragePerChannelMinMaxObserver,
}
_PER_CHANNEL = (PerChannelMinMaxObserver, MovingAveragePerChannelMinMaxObserver)
# Engines whose u8 x s8 kernels accumulate pairs in int16 and saturate on full 8-bit activations.
_SATURATING_BACKENDS = ("x86", "fbgemm")


def _lookup(kind: str, name: str | type, table: dict[str, type]) -> type:
    if isinstance(name, type):
        return name
    if name not in table:
        raise invalid_choice(kind, name, table)
    return table[name]


def make_qconfig(
    backend: str | None = None,
    *,
    is_qat: bool = False,
    activation: str | type | None = None,
    weight: str | type | None = None,
    reduce_range: bool | None = None,
    allow_saturation: bool = False,
) -> QConfig:
    """Returns the qconfig for a backend, PTQ or QAT, optionally with other observers.

    Args:
        backend: quantized engine; the platform's when None.
        is_qat: fake-quantize modules for QAT instead of observers for PTQ.
        activation: activation observer name (see ``ACTIVATION_OBSERVERS``) or class.
        weight: weight observer name (see ``WEIGHT_OBSERVERS``) or class.
        reduce_range: 7-bit activations; by default True on x86/fbgemm, False elsewhere.
        allow_saturation: accept full-range activations on x86/fbgemm (only warns).

    Raises:
        QzError: unknown observer, or a configuration known to collapse accuracy.
    """
    backend = resolve_backend(backend)
    if activation is None and weight is None and reduce_range is None:
        qconfig = get_default_qat_qconfig(backend) if is_qat else get_default_qconfig(backend)
    else:
        saturating = backend in _SATURATING_BACKENDS
        act_cls = _lookup("activation observer", activation or "histogram", ACTIVATION_OBSERVERS)
        if is_qat and act_cls is HistogramObserver:
            act_cls = MovingAverageMinMaxObserver  # histograms are too slow to update every step
        w_default = "per_channel_minmax" if backend != "qnnpack" else "minmax"
        w_cls = _lookup("weight observer", weight or w_default, WEIGHT_OBSERVERS)
        rr = saturating if reduce_range is None else reduce_range
        act_args: dict[str, Any] = {"dtype": torch.quint8, "reduce_range": rr}
        w_args: dict[str, Any] = {"dtype": torch.qint8}
        if issubclass(w_cls, _PER_CHANNEL):
            w_args.update(qscheme=torch.per_channel_symmetric, ch_axis=0)
        else:
            w_args.update(qscheme=torch.per_tensor_symmetric)
        if w_cls is HistogramObserver:
            w_args.pop("qscheme")
        if is_qat:
            q_lo, q_hi = (0, 127) if rr else (0, 255)
            act = FakeQuantize.with_args(observer=act_cls, quant_min=q_lo, quant_max=q_hi, **act_args)
            wt = FakeQuantize.with_args(observer=w_cls, quant_min=-128, quant_max=127, **w_args)
        else:
            act = act_cls.with_args(**act_args)
            wt = w_cls.with_args(**w_args)
        qconfig = QConfig(activation=act, weight=wt)
    check_qconfig(qconfig, backend, allow_saturation=allow_saturation)
    return qconfig


def _observer_of(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "activation_post_process", module)


def check_qconfig(qconfig: QConfig, backend: str, *, allow_saturation: bool = False) -> None:
    """Refuses a qconfig whose activations saturate the backend's kernels.

    On x86/fbgemm, u8 activations over the full 0..255 range overflow the int16 pair sums
    of the VPMADDUBSW kernels; top-1 accuracy was measured to fall from 80% to 25%.
    """
    if backend not in _SATURATING_BACKENDS:
        return
    observer = _observer_of(qconfig.activation())
    q_min, q_max = getattr(observer, "quant_min", 0), getattr(observer, "quant_max", 127)
    if getattr(observer, "dtype", None) == torch.quint8 and q_max - q_min > 127:
        message = (
            f"Activation observer {type(observer).__name__} uses the full 8-bit range "
            f"({q_min}..{q_max}) on backend {backend!r}: its kernels saturate int16 pair sums, "
            "and accuracy collapses (top-1 measured to fall from 80% to 25%). "
            "Use reduce_range=True (the default on this backend) or backend='qnnpack'."
        )
        if not allow_saturation:
            raise QzError(message + " Pass allow_saturation=True to run it anyway.")
        warnings.warn(message, stacklevel=3)
