"""Mixed precision: how much each layer costs when quantized, and which layers to keep in float.

A *layer* is a module that ``convert`` turns into an INT8 module and that holds weights (a conv, a
fused conv-bn-relu, a linear), named as in the model after fusion at its recipe's ``fuse_level``.

``layer_sensitivity`` quantizes one layer at a time (the rest stays float, the layer sits between its
own Quant/DeQuant stubs) and reports the task metric's change and the output SQNR against FP32.
``keep_float_until`` quantizes the whole model, then keeps the most sensitive layers in float
(``partial.FloatIsland``, the builder's ``float_modules``), one at a time, until the metric is within
an allowed drop of FP32. A layer whose INT8 kernel runs slower than its FP32 kernel stays float from
the start: both are timed alone, batch 1, one thread, on the layer's real input (captured from the
first validation sample), interleaved with ``compare_latency``; the Quant/DeQuant around it is not
counted.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, QuantWrapper, get_default_static_quant_module_mappings
from tqdm.auto import tqdm

from qz_core.backend import set_backend
from qz_core.builder import prepare_built, recipe_of
from qz_core.errors import QzError
from qz_core.measure import compare_latency, measure_latency, model_size_mb
from qz_core.qconfig import make_qconfig
from qz_core.task import Task
from qz_core.workflow import calibrate, convert, output_tensors

LAYER_ROUNDS = 20
MODEL_ROUNDS = 5


@dataclass(frozen=True)
class Calibration:
    """The calibration batches and how many of them to feed (``workflow.calibrate``'s limits)."""

    data: Iterable[Any]
    num_batches: int | None = None
    fraction: float | None = None


@dataclass(frozen=True)
class Scorer:
    """Scores models the task's way on labelled validation batches, against the FP32 model.

    Attributes:
        task: the model's task (``score``, ``model_inputs``).
        batches: collated labelled validation batches.
        example: one batch-1 model input, for latency.
        key: the headline metric's name (higher is better): the task's ``headline_key`` of the model's spec.
        sqnr_batches: how many validation batches the output SQNR is computed on.
    """

    task: Task
    batches: Iterable[Any]
    example: Any
    key: str
    sqnr_batches: int = 4

    def metric(self, model: nn.Module) -> float:
        """The headline metric of ``model``."""
        return self.task.score(model, self.batches, progress=False)[self.key]

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[list[torch.Tensor]]:
        """The output tensors of ``model`` on the first ``sqnr_batches`` validation batches."""
        model.eval()
        inputs = [self.task.model_inputs(b) for b in itertools.islice(self.batches, self.sqnr_batches)]
        return [[t.float() for t in output_tensors(model(x))] for x in inputs]


@dataclass(frozen=True)
class LayerSensitivity:
    """What quantizing one layer alone does.

    Attributes:
        name: the layer's dotted name in the fused model.
        metric: the task metric with only this layer in INT8.
        drop: FP32 metric minus ``metric`` (positive: worse).
        sqnr_db: output SQNR against FP32 in dB (None when the outputs cannot be compared).
        fp32_ms: the layer alone in FP32, batch 1, one thread (None when not timed).
        int8_ms: the layer alone in INT8 on a quantized input (None when not timed).
    """

    name: str
    metric: float
    drop: float
    sqnr_db: float | None
    fp32_ms: float | None = None
    int8_ms: float | None = None

    @property
    def slower_in_int8(self) -> bool:
        """True when the layer's INT8 kernel was timed slower than its FP32 kernel."""
        return self.fp32_ms is not None and self.int8_ms is not None and self.int8_ms > self.fp32_ms


@dataclass(frozen=True)
class ModelCost:
    """Metric, size and latency of one model."""

    metric: float
    size_mb: float
    latency_ms: float | None


@dataclass
class MixedPrecisionResult:
    """What ``keep_float_until`` chose and what it cost.

    Attributes:
        metric_key: the task's headline metric.
        max_drop: the allowed drop from FP32.
        fp32: the float model.
        all_int8: every layer in INT8.
        mixed: the chosen model (``all_int8`` when no layer had to stay float).
        float_layers: the layers kept in float, in the order they were chosen.
        slow_layers: those among them kept float because INT8 ran slower.
        met: True when the chosen model is within ``max_drop`` of FP32.
        steps: (number of float layers, metric) after each try.
    """

    metric_key: str
    max_drop: float
    fp32: ModelCost
    all_int8: ModelCost
    mixed: ModelCost
    float_layers: list[str]
    slow_layers: list[str]
    met: bool
    steps: list[tuple[int, float]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        key, lines = self.metric_key, []
        verdict = "within" if self.met else "NOT within"
        lines.append(
            f"mixed precision: {key} {self.mixed.metric:.2f} vs FP32 {self.fp32.metric:.2f} "
            f"(all INT8 {self.all_int8.metric:.2f}); {verdict} the allowed drop of {self.max_drop:g}"
        )
        names = ", ".join(self.float_layers) or "none"
        lines.append(f"kept in float ({len(self.float_layers)}): {names}")
        if self.slow_layers:
            lines.append(f"  of which slower in INT8 than FP32 on this backend: {', '.join(self.slow_layers)}")
        lines.append(f"size: {self.mixed.size_mb:.2f} MB vs {self.all_int8.size_mb:.2f} MB all INT8")
        if self.mixed.latency_ms is not None and self.all_int8.latency_ms is not None:
            lines.append(
                f"latency (batch 1, 1 thread): {self.mixed.latency_ms:.2f} ms vs {self.all_int8.latency_ms:.2f} ms "
                f"all INT8, {self.fp32.latency_ms:.2f} ms FP32"
            )
        return "\n".join(lines)


def fused_copy(float_model: nn.Module) -> nn.Module:
    """A fused float copy of a model built by a qz builder with ``quantize=False`` (its recipe's ``fuse_level``)."""
    recipe = recipe_of(float_model)
    if recipe.quantize:
        raise QzError(f"{recipe.name}: mixed precision starts from the float model (built with quantize=False).")
    model = copy.deepcopy(float_model).eval()
    if recipe.options.fuse_level != "none":
        model.fuse_model(is_qat=False, level=recipe.options.fuse_level)
    return model


def quantizable_layers(fused: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """The layers ``convert`` turns into INT8 modules with weights, outermost only, in registration order.

    Args:
        fused: a fused float model (``fused_copy``).
        exclude: dotted names whose layers are left out (modules the recipe already keeps in float).
    """
    mapping = get_default_static_quant_module_mappings()
    skipped = (QuantStub, DeQuantStub, FloatFunctional)
    names: list[str] = []
    for name, module in fused.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in (*names, *exclude)) or name in exclude
        if not name or inside or isinstance(module, skipped) or type(module) not in mapping:
            continue
        if next(module.parameters(), None) is not None:
            names.append(name)
    return names


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_only(float_model: nn.Module, layer: str, calibration: Calibration, task: Task) -> nn.Module:
    """A converted copy of ``float_model`` in which only ``layer`` runs in INT8, between its own stubs."""
    options = recipe_of(float_model).options
    model = fused_copy(float_model)
    backend = set_backend(options.backend)
    model.qconfig = None
    wrapper = QuantWrapper(model.get_submodule(layer))
    wrapper.qconfig = make_qconfig(
        backend,
        activation=options.activation_observer,
        weight=options.weight_observer,
        reduce_range=options.reduce_range,
        allow_saturation=options.allow_saturation,
    )
    _replace(model, layer, wrapper)
    tq.prepare(model, inplace=True)
    _calibrate(model, calibration, task)
    return convert(model, inplace=True)


def _calibrate(model: nn.Module, calibration: Calibration, task: Task) -> int:
    return calibrate(
        model,
        calibration.data,
        num_batches=calibration.num_batches,
        fraction=calibration.fraction,
        progress=False,
        inputs=task.model_inputs,
    )


def sqnr_db(reference: Sequence[Sequence[torch.Tensor]], test: Sequence[Sequence[torch.Tensor]]) -> float | None:
    """Signal-to-quantization-noise ratio (dB) of ``test`` outputs against ``reference``, over same-shaped tensors."""
    signal = noise = 0.0
    for ref_batch, test_batch in zip(reference, test, strict=False):
        for ref, out in zip(ref_batch, test_batch, strict=False):
            if ref.shape == out.shape:
                signal += float(ref.pow(2).sum())
                noise += float((ref - out).pow(2).sum())
    if signal == 0.0:
        return None
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def _layer_input(fused: nn.Module, layer: str, example: Any) -> tuple[Any, ...]:
    """The positional inputs ``layer`` receives when ``fused`` runs on ``example``."""
    captured: list[tuple[Any, ...]] = []
    handle = fused.get_submodule(layer).register_forward_pre_hook(lambda _m, args: captured.append(args))
    try:
        with torch.no_grad():
            fused(example)
    finally:
        handle.remove()
    if not captured:
        raise QzError(f"Layer {layer!r} did not run on the example input.")
    return captured[0]


def time_layer(fused: nn.Module, quantized: nn.Module, layer: str, example: Any) -> tuple[float, float]:
    """(FP32 ms, INT8 ms) of ``layer`` alone: the fused float layer vs the INT8 layer of ``quantize_only``'s model.

    Both run on the input the layer gets from ``example`` (batch 1), the INT8 one already quantized by the
    layer's own Quant stub, one thread, interleaved.
    """
    args = _layer_input(fused, layer, example)
    wrapper = quantized.get_submodule(layer)
    float_layer, int8_layer = fused.get_submodule(layer), wrapper.module
    with torch.no_grad():
        int8_args = tuple(wrapper.quant(a) for a in args)
    timings = compare_latency(
        {"fp32": lambda: float_layer(*args), "int8": lambda: int8_layer(*int8_args)},
        warmup=3,
        rounds=LAYER_ROUNDS,
        threads=1,
    )
    return timings["fp32"].median_ms, timings["int8"].median_ms


def layer_sensitivity(
    float_model: nn.Module,
    calibration: Calibration,
    scorer: Scorer,
    *,
    time_layers: bool = True,
    progress: bool = True,
    fp32_metric: float | None = None,
) -> list[LayerSensitivity]:
    """Quantizes each layer alone and scores it; most sensitive first (``rank_by_sensitivity``).

    Args:
        float_model: a model built by a qz builder with ``quantize=False`` (its recipe gives fusion and observers).
        calibration: the calibration batches.
        scorer: the task's scoring on validation batches.
        time_layers: also time each layer alone in FP32 and INT8.
        progress: a progress bar over layers.
        fp32_metric: the float model's metric, if already known.
    """
    fused = fused_copy(float_model)
    layers = quantizable_layers(fused, recipe_of(float_model).options.float_modules)
    if not layers:
        raise QzError(f"{recipe_of(float_model).name} has no layer that quantizes to an INT8 module with weights.")
    baseline = scorer.metric(float_model) if fp32_metric is None else fp32_metric
    reference = scorer.outputs(float_model)
    results = []
    for layer in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress):
        quantized = quantize_only(float_model, layer, calibration, scorer.task)
        metric = scorer.metric(quantized)
        timing = time_layer(fused, quantized, layer, scorer.example) if time_layers else (None, None)
        sqnr = sqnr_db(reference, scorer.outputs(quantized))
        results.append(LayerSensitivity(layer, metric, baseline - metric, sqnr, *timing))
    return rank_by_sensitivity(results)


def rank_by_sensitivity(results: Iterable[LayerSensitivity]) -> list[LayerSensitivity]:
    """Largest metric drop first, then lowest SQNR (an unknown SQNR counts as the best).

    A metric that rises when a layer is quantized counts as no drop: one validation image more or less is
    noise, and the SQNR then decides.
    """
    return sorted(results, key=lambda r: (-max(r.drop, 0.0), math.inf if r.sqnr_db is None else r.sqnr_db))


def quantize_keeping(
    float_model: nn.Module, float_layers: Sequence[str], calibration: Calibration, task: Task
) -> nn.Module:
    """A converted copy of ``float_model`` with ``float_layers`` (names in the fused model) kept in float."""
    kept = (*recipe_of(float_model).options.float_modules, *float_layers)
    model = prepare_built(copy.deepcopy(float_model), float_modules=kept)
    _calibrate(model, calibration, task)
    return convert(model, inplace=True)


def _cost(model: nn.Module, scorer: Scorer, metric: float | None = None) -> ModelCost:
    latency = measure_latency(model, scorer.example, warmup=1, rounds=MODEL_ROUNDS, threads=1).median_ms
    return ModelCost(scorer.metric(model) if metric is None else metric, model_size_mb(model), latency)


def keep_float_until(
    float_model: nn.Module,
    calibration: Calibration,
    scorer: Scorer,
    max_drop: float,
    *,
    latency_aware: bool = True,
    progress: bool = True,
    on_step: Callable[[list[str], float], None] | None = None,
) -> tuple[nn.Module, MixedPrecisionResult]:
    """Keeps the most sensitive layers in float, one at a time, until the metric is within ``max_drop`` of FP32.

    Args:
        float_model: a model built by a qz builder with ``quantize=False``.
        calibration: the calibration batches.
        scorer: the task's scoring on validation batches.
        max_drop: the allowed drop of the task's headline metric (its own units: top-1 points, mAP, mIoU).
        latency_aware: layers whose INT8 kernel runs slower than FP32 stay float from the start.
        progress: progress bars.
        on_step: called with the float layers and the metric after each try.

    Returns:
        The chosen converted model and what was chosen.

    Raises:
        QzError: a negative or non-finite ``max_drop``.
    """
    if not (math.isfinite(max_drop) and max_drop >= 0):
        raise QzError(f"--max-drop must be a number >= 0; got {max_drop}.")
    fp32 = _cost(float_model, scorer)
    model = quantize_keeping(float_model, [], calibration, scorer.task)
    all_int8 = _cost(model, scorer)
    chosen, slow, steps = [], [], [(0, all_int8.metric)]
    mixed = all_int8
    if fp32.metric - all_int8.metric > max_drop or latency_aware:
        ranking = layer_sensitivity(
            float_model, calibration, scorer, time_layers=latency_aware, progress=progress, fp32_metric=fp32.metric
        )
        slow = [r.name for r in ranking if latency_aware and r.slower_in_int8]
        queue = [r.name for r in ranking if r.name not in slow]
        chosen = list(slow)
        if chosen:
            model, mixed = _try(float_model, chosen, calibration, scorer, steps, on_step)
        while fp32.metric - mixed.metric > max_drop and queue:
            chosen.append(queue.pop(0))
            model, mixed = _try(float_model, chosen, calibration, scorer, steps, on_step)
    mixed = _cost(model, scorer, mixed.metric) if chosen else all_int8
    met = fp32.metric - mixed.metric <= max_drop
    return model, MixedPrecisionResult(scorer.key, max_drop, fp32, all_int8, mixed, chosen, slow, met, steps)


def _try(
    float_model: nn.Module,
    chosen: list[str],
    calibration: Calibration,
    scorer: Scorer,
    steps: list[tuple[int, float]],
    on_step: Callable[[list[str], float], None] | None,
) -> tuple[nn.Module, ModelCost]:
    model = quantize_keeping(float_model, chosen, calibration, scorer.task)
    metric = scorer.metric(model)
    steps.append((len(chosen), metric))
    if on_step is not None:
        on_step(list(chosen), metric)
    return model, ModelCost(metric, model_size_mb(model), None)
