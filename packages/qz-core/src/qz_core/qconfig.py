"""Per-backend qconfigs for PTQ and QAT, with observer overrides for studies."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
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
from torch.ao.quantization.observer import ObserverBase

from qz_core.backend import resolve_backend
from qz_core.errors import QzError, invalid_choice
from qz_core.fusion import RELU6_SLOT_ATTR

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


class ClampedActivation(ObserverBase):
    """An activation observer (or QAT fake-quantize) that first clamps its input to [low, high].

    Calibration and QAT then see a clamped activation (a fused conv-ReLU standing for conv-ReLU6), and
    the INT8 output range ends at most at ``high``.

    Args:
        inner: the constructor of the observer or fake-quantize that records the clamped values.
        low: lower clamp.
        high: upper clamp.
        **kwargs: passed to ``inner`` (``factory_kwargs`` from ``prepare``).
    """

    def __init__(self, inner: Callable[..., nn.Module], low: float, high: float, **kwargs: Any) -> None:
        recorder = inner(**kwargs)
        super().__init__(dtype=recorder.dtype, is_dynamic=getattr(recorder, "is_dynamic", False))
        self.inner = recorder
        self.low, self.high = low, high
        for name in ("qscheme", "quant_min", "quant_max", "reduce_range"):
            if hasattr(recorder, name):
                setattr(self, name, getattr(recorder, name))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.clamp(self.low, self.high))

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.inner.calculate_qparams()

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


def _effective_qconfigs(module: nn.Module, inherited: QConfig | None = None, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> the qconfig ``prepare`` will give each module (its own, else its parent's)."""
    own = getattr(module, "qconfig", inherited)
    found = {prefix: own}
    for name, child in module.named_children():
        found |= _effective_qconfigs(child, own, f"{prefix}.{name}" if prefix else name)
    return found


def _quant_range_is_reduced(activation: Callable[..., nn.Module]) -> bool:
    """True when the observer's range is narrower than its dtype's (x86's 7-bit activations)."""
    observer = activation()
    info = torch.iinfo(observer.dtype)
    return observer.quant_max - observer.quant_min < info.max - info.min


def keep_relu6(model: nn.Module, exact: bool = False) -> int:
    """Makes each conv-bn-ReLU6 that fusion turned into conv-ReLU compute ReLU6 in INT8 (call before ``prepare``).

    The fused module's output observer clamps to [0, 6], so calibration and QAT see the float model's
    function and the INT8 range ends at most at 6. Where the quantized range fills the dtype (qnnpack),
    requantization saturates there: the ReLU6 is exact, at no cost. Where it is reduced to 7 bits (x86),
    requantization saturates only at twice the range (12); with ``exact`` a quantized ReLU6 goes back into
    its slot (measured: about 10% more eager latency on MobileNetV2). Modules left in float are untouched.

    Returns:
        The number of ReLU6 kept.
    """
    effective = _effective_qconfigs(model)
    count = 0
    for name, module in model.named_modules():
        slot, qconfig = getattr(module, RELU6_SLOT_ATTR, None), effective.get(name)
        if slot is None or qconfig is None:
            continue
        module.qconfig = QConfig(
            activation=ClampedActivation.with_args(inner=qconfig.activation, low=0.0, high=6.0),
            weight=qconfig.weight,
        )
        if exact and _quant_range_is_reduced(qconfig.activation):
            setattr(module, slot, nn.ReLU6())
        count += 1
    return count
