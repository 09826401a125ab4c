"""What works for a model, measured: build, PTQ, QAT, INT8 forward per engine, FP32/INT8 ONNX.

The support tables and the per-family tests both run ``probe_model``; nothing is written by hand.
"""

from __future__ import annotations

import gc
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qz_core.backend import set_backend, supported_backends
from qz_core.partial import count_float_islands
from qz_core.registry import get_model_entry
from qz_core.workflow import calibrate, convert

DEFAULT_ENGINES = ("x86", "qnnpack")


@torch.no_grad()
def estimate_bn_stats(model: nn.Module, batches: Sequence[Any]) -> None:
    """Re-estimates BatchNorm running statistics from ``batches`` (cumulative average).

    Random-weight models otherwise push activations to zero or infinity, and their INT8 error
    and latency mean nothing. Only the BatchNorm layers are put in training mode: the rest of the
    model (dropout, a detector's inference path, which needs no targets) runs as in eval.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum


@dataclass
class SupportResult:
    """One row of the support table; a failed step holds its error message in ``errors``."""

    name: str
    task: str
    ptq: bool = False
    qat: bool = False
    engines: dict[str, bool] = field(default_factory=dict)
    fp32_onnx: bool = False
    int8_onnx: bool = False
    opset: int = 13
    float_islands: int | None = None
    int8_max_diff: float | None = None
    onnx_max_diff: float | None = None
    onnx_fp32_diff: float | None = None
    output_range: float | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _step(result: SupportResult, key: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failed step is a result, reported in the table
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result.errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} ({last.name})"
        return None


def _max_diff(a: Any, b: Any) -> float:
    from qz_core.onnx_export import _flatten

    pairs = zip(_flatten(a) if not isinstance(a, list) else a, _flatten(b), strict=True)
    return float(max(abs(x.astype("float64") - y.astype("float64")).max() for x, y in pairs))


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
    """Runs model ``name`` (random weights, BatchNorm re-estimated) through every qz step.

    Args:
        name: a registered model.
        engines: quantized engines to convert and run on (those this build lacks are skipped).
        example_input: input batch; random images at the entry's input size by default.
        calib_batches: random calibration batches.
        onnx: also export FP32 and INT8 (first engine) ONNX and run them in onnxruntime.
        build_kwargs: extra builder keywords (e.g. ``num_classes``).

    A family whose models need another path registers it: ``probe=`` in the entry's metadata
    replaces this function (detectors: targets for QAT, raw head outputs to compare), and
    ``probe_build_kwargs=`` are builder keywords every probe of the model gets (YOLO's
    ``export=True``: the deployable output).
    """
    entry = get_model_entry(name)
    build_kwargs = {**entry.meta.get("probe_build_kwargs", {}), **(build_kwargs or {})}
    options = dict(engines=engines, example_input=example_input, calib_batches=calib_batches, onnx=onnx, opset=opset)
    probe = entry.meta.get("probe")
    if probe is not None and example_input is None:
        options["example_input"] = torch.rand(1, 3, *entry.input_size)
    probe = probe or _probe_model
    if work_dir is not None:
        return probe(name, work_dir=Path(work_dir), build_kwargs=build_kwargs, **options)
    # Checkpoints and ONNX files can take GBs: never leave them behind.
    with tempfile.TemporaryDirectory(prefix="qz-probe-") as tmp:
        return probe(name, work_dir=Path(tmp), build_kwargs=build_kwargs, **options)


def _probe_model(
    name: str,
    *,
    engines: Sequence[str],
    example_input: Any,
    calib_batches: int,
    onnx: bool,
    opset: int,
    work_dir: Path,
    build_kwargs: dict[str, Any] | None,
) -> SupportResult:
    entry = get_model_entry(name)
    result = SupportResult(name, entry.task, opset=opset)
    kwargs = dict(build_kwargs or {})
    generator = torch.Generator().manual_seed(0)
    x = example_input if example_input is not None else torch.randn(1, 3, *entry.input_size, generator=generator)
    batches = [torch.randn(x.shape, generator=generator) for _ in range(max(calib_batches, 2))]
    # BatchNorm statistics need more than one value per channel, even behind 1x1 feature maps.
    bn_shape = (max(2, x.shape[0]), *x.shape[1:])
    bn_batches = [torch.randn(bn_shape, generator=generator) for _ in range(len(batches))]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)

    float_model = _step(result, "build", lambda: entry.builder(**kwargs))
    if float_model is None:
        return result
    estimate_bn_stats(float_model, bn_batches)
    checkpoint = work / f"{name}_fp32.pth"
    torch.save(float_model.state_dict(), checkpoint)
    with torch.no_grad():
        reference = float_model(x)
    if onnx:
        from qz_core.onnx_export import export_onnx

        report = _step(
            result, "fp32_onnx", lambda m=float_model: export_onnx(m, work / f"{name}_fp32.onnx", x, opset=opset)
        )
        result.fp32_onnx = report is not None
    del float_model

    available = [e for e in engines if e in supported_backends()]
    for i, engine in enumerate(available):

        def ptq(engine: str = engine) -> nn.Module:
            model = entry.builder(weights=str(checkpoint), quantize=True, backend=engine, **kwargs)
            calibrate(model, batches[:calib_batches], progress=False)
            return convert(model)

        int8 = _step(result, f"ptq[{engine}]", ptq)
        if int8 is None:
            result.engines[engine] = False
            continue
        set_backend(engine)
        with torch.no_grad():
            out = _step(result, f"forward[{engine}]", lambda m=int8: m(x))
        result.engines[engine] = out is not None
        if i == 0 and out is not None:
            result.ptq = True
            result.float_islands = count_float_islands(int8)
            result.int8_max_diff = _max_diff(out, reference)
            result.output_range = float(max(t.max() - t.min() for t in _tensors(reference)))
            if onnx:
                from qz_core.onnx_export import export_onnx

                path = work / f"{name}_int8.onnx"
                report = _step(result, "int8_onnx", lambda m=int8, p=path: export_onnx(m, p, x, opset=opset))
                result.int8_onnx = report is not None
                if report is not None:
                    from qz_core.onnx_export import run_onnx

                    result.onnx_max_diff = report.max_abs_diff
                    result.onnx_fp32_diff = _max_diff(run_onnx(path, x), reference)
        del int8
        gc.collect()

    def qat() -> None:
        model = entry.builder(weights=str(checkpoint), quantize=True, is_qat=True, backend=available[0], **kwargs)
        model.train()
        for batch in batches[:calib_batches]:
            if isinstance(batch, torch.Tensor) and len(batch) == 1:  # BatchNorm trains on more than one value
                batch = torch.cat([batch, batch.flip(-1)])
            out = model(batch)
            sum(t.float().mean() for t in _tensors(out)).backward()
        int8 = convert(model)
        with torch.no_grad():
            int8(x)

    result.qat = available != [] and _step(result, "qat", qat) is None and "qat" not in result.errors
    gc.collect()
    return result


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _tensors(v)]
    return []


@torch.no_grad()
def float_difference(name: str, reference: nn.Module, example_input: Any, work_dir: str | Path, **kwargs: Any) -> float:
    """Largest |difference| between ``reference`` and qz's unquantized ``name`` on the same weights.

    The reference's state dict goes through a checkpoint file and qz's strict loader, so a
    quantizable model that renames or drops a weight fails here. Zero means exactly equal.
    """
    path = Path(work_dir) / f"{name}_reference.pth"
    torch.save(reference.state_dict(), path)
    model = get_model_entry(name).builder(weights=str(path), **kwargs).eval()
    return _max_diff(model(example_input), reference.eval()(example_input))
