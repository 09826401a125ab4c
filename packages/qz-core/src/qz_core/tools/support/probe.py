"""What works for a model, measured: build, PTQ, QAT, INT8 forward per engine, FP32/INT8 ONNX.

The support tables and the per-family tests both run ``probe_model``; nothing is written by hand.
Everything task-specific comes through the model's ``Task``: its example inputs, how random weights
are settled, the module that is compared and exported (``export_module``), and the QAT loss.
"""

from __future__ import annotations

import contextlib
import gc
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qz_core.backend import set_backend, supported_backends
from qz_core.builder import ModelSpec
from qz_core.errors import QzError
from qz_core.files import write_atomic
from qz_core.partial import count_float_islands
from qz_core.registry import get_model_builder, get_model_spec, get_task
from qz_core.task import Task
from qz_core.tools.common import describe_error
from qz_core.tools.support.results import SupportResult
from qz_core.workflow import calibrate, convert, output_tensors, train_qat

DEFAULT_ENGINES = ("x86", "qnnpack")
QAT_LR = 1e-5  # random weights: a small step keeps the loss finite


def arrays(output: Any) -> list[np.ndarray]:
    """The tensors of a model output (tensors, dicts, lists, tuples; or onnxruntime's arrays) as float64 arrays."""
    if isinstance(output, np.ndarray):
        return [output.astype(np.float64)]
    if isinstance(output, (list, tuple)) and output and all(isinstance(a, np.ndarray) for a in output):
        return [a.astype(np.float64) for a in output]
    return [t.detach().cpu().double().numpy() for t in output_tensors(output)]


def max_difference(a: Any, b: Any) -> float:
    """Largest |a - b| over the paired tensors of two outputs."""
    pairs = zip(arrays(a), arrays(b), strict=True)
    return float(max((np.abs(x - y).max() for x, y in pairs if x.size), default=0.0))


def sqnr(output: Any, reference: Any) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum reference^2 / sum (output - reference)^2).

    Over all paired tensors of the two outputs; ``inf`` when they are equal.
    """
    pairs = list(zip(arrays(output), arrays(reference), strict=True))
    signal = sum(float(np.square(r).sum()) for _, r in pairs)
    noise = sum(float(np.square(o - r).sum()) for o, r in pairs)
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class _Probe:
    """One probe's shared state: the model, its task, the inputs, the FP32 reference, the result."""

    spec: ModelSpec
    task: Task
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any]
    work: Path
    opset: int
    onnx: bool
    result: SupportResult
    x: Any = None
    calibration: list[Any] = field(default_factory=list)
    reference: list[np.ndarray] = field(default_factory=list)
    checkpoint: Path | None = None

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        """Runs ``fn``; a failure is recorded under ``key`` and returns None."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is a result, reported in the table
            self.result.errors[key] = describe_error(exc)
            return None

    def run(self, model: nn.Module, tag: str) -> list[np.ndarray] | None:
        """The export module's outputs on ``x`` (step ``forward[tag]``), or None when it or the whole model fails.

        When the export module is part of the model, the whole model (decoding, NMS) runs too (``whole[tag]``).
        """
        with torch.no_grad():
            exported = self.task.export_module(model)
            out = self.step(f"forward[{tag}]", lambda: arrays(exported(self.x)))
            if out is not None and exported is not model:
                self.step(f"whole[{tag}]", lambda: model(self.x))
        return None if f"whole[{tag}]" in self.result.errors else out


def _random_like(task: Task, spec: ModelSpec, x: Any, batch_size: int) -> Any:
    if isinstance(x, Tensor):
        return torch.rand((batch_size, *x.shape[1:]))
    return task.example_input(spec, batch_size)


def _prepare_inputs(p: _Probe, example_input: Any, calib_batches: int) -> None:
    p.x = example_input if example_input is not None else p.task.example_input(p.spec)
    batch = len(p.x) if isinstance(p.x, Tensor) else 1
    # The compared input is calibrated on too: INT8 is then judged on the ranges it was calibrated for.
    p.calibration = [p.x, *(_random_like(p.task, p.spec, p.x, batch) for _ in range(max(calib_batches, 1)))]


def _float_model(p: _Probe, settle_batches: int) -> nn.Module | None:
    """Builds the float model, settles its random weights, saves it and records the FP32 reference."""
    model = p.step("build", lambda: p.builder(**p.kwargs))
    if model is None:
        return None
    # BatchNorm statistics need more than one value per channel, even behind 1x1 feature maps.
    batch = max(2, len(p.x) if isinstance(p.x, Tensor) else 1)
    settle = [_random_like(p.task, p.spec, p.x, batch) for _ in range(settle_batches)]
    p.step("settle", lambda: p.task.settle_random_weights(model, settle))
    if "settle" in p.result.errors:
        return None
    model.eval()
    p.checkpoint = p.work / f"{p.spec.name}_fp32.pth"
    write_atomic(p.checkpoint, lambda file: torch.save(model.state_dict(), file))
    reference = p.run(model, "fp32")
    if reference is None:
        return None
    p.reference = reference
    p.result.unrelated_sqnr = _unrelated_sqnr(p, model)
    return model


@torch.no_grad()
def _unrelated_sqnr(p: _Probe, model: nn.Module) -> float | None:
    """How close to FP32 the FP32 output of another random input comes (dB); None for non-tensor inputs."""
    if not isinstance(p.x, Tensor):
        return None
    other = _random_like(p.task, p.spec, p.x, len(p.x))
    return sqnr(p.task.export_module(model)(other), p.reference)


def _export(p: _Probe, model: nn.Module, kind: str) -> Any:
    from qz_core.onnx_export import export_onnx

    path = p.work / f"{p.spec.name}_{kind}.onnx"
    return p.step(f"{kind}_onnx", lambda: export_onnx(p.task.export_module(model), path, p.x, opset=p.opset))


def _output_range(reference: Sequence[np.ndarray]) -> float:
    return float(max((np.ptp(r) for r in reference if r.size), default=0.0))


def _fp32_onnx(p: _Probe, model: nn.Module) -> None:
    report = _export(p, model, "fp32")
    p.result.fp32_onnx = report is not None
    tolerance = 1e-3 * max(1.0, _output_range(p.reference))
    if report is not None and report.max_abs_diff is not None and report.max_abs_diff > tolerance:
        p.result.errors["fp32_onnx"] = f"onnxruntime differs from PyTorch by {report.max_abs_diff:.4g}"


def _int8_onnx(p: _Probe, int8: nn.Module) -> None:
    from qz_core.onnx_export import run_onnx

    report = _export(p, int8, "int8")
    p.result.int8_onnx = report is not None
    if report is not None:
        p.result.onnx_max_diff = report.max_abs_diff
        p.result.onnx_fp32_diff = max_difference(run_onnx(report.path, p.x), p.reference)


def _ptq(p: _Probe, engine: str, first: bool) -> None:
    def quantize() -> nn.Module:
        model = p.builder(weights=str(p.checkpoint), quantize=True, backend=engine, **p.kwargs)
        calibrate(model, p.calibration, progress=False, inputs=_identity)
        return convert(model)

    int8 = p.step(f"ptq[{engine}]", quantize)
    if int8 is None:
        p.result.engines[engine] = False
        return
    set_backend(engine)
    out = p.run(int8, engine)
    p.result.engines[engine] = out is not None
    if out is not None:
        p.result.int8_sqnr[engine] = sqnr(out, p.reference)
    if first and out is not None:
        p.result.ptq = True
        p.result.float_islands = count_float_islands(int8)
        p.result.int8_max_diff = max_difference(out, p.reference)
        p.result.output_range = _output_range(p.reference)
        if p.onnx:
            _int8_onnx(p, int8)


def _qat(p: _Probe, engine: str) -> None:
    model = p.builder(weights=str(p.checkpoint), quantize=True, is_qat=True, backend=engine, **p.kwargs)
    batch = p.task.example_training_batch(p.spec)
    losses = train_qat(model, [batch], step_loss=p.task.training_loss, lr=QAT_LR, progress=False)
    if not all(math.isfinite(v) for v in losses):
        raise QzError(f"QAT losses are not finite: {losses}.")
    int8 = convert(model)
    set_backend(engine)
    if p.run(int8, "qat") is None:
        raise QzError("the converted QAT model did not run (see forward[qat]).")


def _probe(p: _Probe, engines: Sequence[str], example_input: Any, calib_batches: int) -> SupportResult:
    _prepare_inputs(p, example_input, calib_batches)
    float_model = _float_model(p, settle_batches=max(calib_batches, 2))
    if float_model is None:
        return p.result
    if p.onnx:
        _fp32_onnx(p, float_model)
    del float_model
    available = [e for e in engines if e in supported_backends()]
    for i, engine in enumerate(available):
        _ptq(p, engine, first=i == 0)
        gc.collect()
    if available:
        p.step("qat", lambda: _qat(p, available[0]))
        p.result.qat = "qat" not in p.result.errors
    gc.collect()
    return p.result


def probe_model(
    name: str,
    *,
    engines: Sequence[str] = DEFAULT_ENGINES,
    example_input: Any = None,
    calib_batches: int = 2,
    onnx: bool = True,
    opset: int = 13,
    work_dir: str | Path | None = None,
    build_kwargs: dict[str, Any] | None = None,
) -> SupportResult:
    """Runs model ``name`` (random weights, settled by its task) through every qz step.

    Builds the float model, settles its random weights (``Task.settle_random_weights``), saves them,
    then per engine builds the quantizable model from that file, calibrates on random inputs, converts
    and runs it; compares the task's export module FP32 vs INT8 and, with ``onnx``, exports both to
    ONNX and runs them in onnxruntime; finally runs a QAT step on ``Task.training_loss``, converts and runs.

    Args:
        name: a registered model.
        engines: quantized engines to convert and run on (those this build lacks are skipped).
        example_input: the model input to compare on; ``Task.example_input`` by default.
        calib_batches: random calibration batches, shaped like the example input (which is calibrated on too).
        onnx: also export FP32 and INT8 (first engine) ONNX and run them in onnxruntime.
        opset: the ONNX opset.
        work_dir: where checkpoints and ONNX files go; a temporary folder, removed after, when None.
        build_kwargs: builder keywords on top of the spec's ``probe_kwargs``.
    """
    spec = get_model_spec(name)
    kwargs = {**spec.probe_kwargs, **(build_kwargs or {})}
    if work_dir is None:
        # Checkpoints and ONNX files can take GBs: never leave them behind.
        with tempfile.TemporaryDirectory(prefix="qz-probe-") as tmp:
            options = dict(engines=engines, example_input=example_input, calib_batches=calib_batches)
            return probe_model(name, onnx=onnx, opset=opset, work_dir=tmp, build_kwargs=build_kwargs, **options)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result = SupportResult(name, spec.task, opset=opset)
    p = _Probe(spec, get_task(spec.task), get_model_builder(name), kwargs, work, opset, onnx, result)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _probe(p, engines, example_input, calib_batches)


def run_support(
    names: Iterable[str],
    *,
    engines: Sequence[str] = DEFAULT_ENGINES,
    opset: int = 13,
    onnx: bool = True,
    calib_batches: int = 2,
    build_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[SupportResult]:
    """``probe_model`` on each model; the rows of the support table (a crash is a row with its error)."""
    results = []
    bar = tqdm(list(names), desc="support", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix(model=name)
        try:
            result = probe_model(
                name, engines=engines, opset=opset, onnx=onnx, calib_batches=calib_batches, build_kwargs=build_kwargs
            )
        except Exception as exc:  # noqa: BLE001 - an unknown name or a probe crash is a row too
            task = ""
            with contextlib.suppress(QzError):
                task = get_model_spec(name).task
            result = SupportResult(name, task, opset=opset, errors={"probe": describe_error(exc)})
        results.append(result)
        gc.collect()
    return results


@torch.no_grad()
def float_difference(name: str, reference: nn.Module, example_input: Any, work_dir: str | Path, **kwargs: Any) -> float:
    """Largest |difference| between ``reference`` and qz's unquantized ``name`` on the same weights.

    The reference's state dict goes through a checkpoint file and qz's strict loader, so a
    quantizable model that renames or drops a weight fails here. Zero means exactly equal.
    """
    path = Path(work_dir) / f"{name}_reference.pth"
    write_atomic(path, lambda file: torch.save(reference.state_dict(), file))
    model = get_model_builder(name)(weights=str(path), **kwargs).eval()
    return max_difference(model(example_input), reference.eval()(example_input))
