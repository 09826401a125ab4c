"""The benchmark suite and the support sweep: every registered model, measured, in one process.

``run_benchmark`` builds each model (random weights with BatchNorm statistics re-estimated, or
given weights), PTQ-calibrates and converts it, exports FP32 and INT8 ONNX, then times FP32 eager,
INT8 eager, FP32 and INT8 in onnxruntime (and torchvision's own INT8 model where one exists)
interleaved, round by round, so machine drift hits all alike. With ``ort_quantize`` it also
quantizes the FP32 ONNX file with onnxruntime's own ``quantize_static`` (``ORT_OWN``) and times
those files in the same rounds, so qz's INT8 ONNX is measured against ORT's best own INT8 file.
``run_support`` runs ``probe_model`` on every model. Nothing in the tables they feed is written by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qz_core.backend import resolve_backend, set_backend
from qz_core.bench import Latency, compare_latency, eager_op_profile, model_size_mb, timing_setup
from qz_core.errors import QzError, invalid_choice
from qz_core.ort_tools import ORT_OWN, describe_profile, ort_op_profile, ort_own_runners, ort_runner, ort_session
from qz_core.partial import count_float_islands
from qz_core.registry import TASKS, get_model_entry, list_models
from qz_core.support import DEFAULT_ENGINES, SupportResult, estimate_bn_stats, probe_model
from qz_core.workflow import calibrate, convert

# What is timed, in the order of the table columns: key -> column label.
RUNNERS = {
    "fp32": "FP32 eager",
    "int8": "INT8 eager",
    "ort_fp32": "ORT FP32",
    "ort_int8": "ORT INT8",
    "tv_int8": "torchvision INT8",
    "ort_s8s8": "ORT own S8S8",
    "ort_u8s8_qdq": "ORT own U8S8 QDQ",
    "ort_u8s8_qop": "ORT own U8S8 QOperator",
}

# The deployed ratio a model must reach when its registration names no ``deployed_ratio_target``:
# INT8 must at least be faster than FP32.
DEFAULT_DEPLOYED_RATIO_TARGET = 1.0

NO_TORCHVISION_MODEL = "torchvision has no quantizable model of this name"

# torchvision.models.quantization builders, by their (and qz's) model name.
TORCHVISION_QUANTIZABLE = (
    "googlenet",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "resnet18",
    "resnet50",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
)


@dataclass
class BenchRow:
    """One model's measurements; ``error`` is set when it could not be quantized or timed."""

    model: str
    task: str = ""
    family: str = ""
    backend: str = ""
    batch_size: int = 1
    input_size: tuple[int, int] = (224, 224)
    latency: dict[str, Latency] = field(default_factory=dict)
    fp32_mb: float | None = None
    int8_mb: float | None = None
    fp32_onnx_mb: float | None = None
    int8_onnx_mb: float | None = None
    peak_rss_mb: float | None = None
    start_rss_mb: float | None = None
    float_islands: int | None = None
    seconds: float | None = None
    error: str | None = None
    notes: dict[str, str] = field(default_factory=dict)
    target: float = DEFAULT_DEPLOYED_RATIO_TARGET
    hotspots: dict[str, str] = field(default_factory=dict)

    def ms(self, key: str) -> float | None:
        """Median latency of runner ``key`` (see ``RUNNERS``) in ms, None if not timed."""
        return self.latency[key].median_ms if key in self.latency else None

    @property
    def eager_ratio(self) -> float | None:
        """INT8 eager / FP32 eager (below 1 means INT8 is faster)."""
        return _ratio(self.ms("int8"), self.ms("fp32"))

    @property
    def deployed_ratio(self) -> float | None:
        """min(INT8 eager, ORT INT8) / FP32 eager: the best INT8 deployment against the FP32 baseline."""
        best = [t for t in (self.ms("int8"), self.ms("ort_int8")) if t is not None]
        return _ratio(min(best), self.ms("fp32")) if best else None

    @property
    def meets_target(self) -> bool | None:
        """Whether the deployed ratio is at most the model's target (None when not measured)."""
        ratio = self.deployed_ratio
        return None if ratio is None else ratio <= self.target

    @property
    def slower_than_torchvision(self) -> bool | None:
        """Whether qz's INT8 eager is slower than torchvision's beyond noise (its p10 above their p90)."""
        if "int8" not in self.latency or "tv_int8" not in self.latency:
            return None
        return self.latency["int8"].p10_ms > self.latency["tv_int8"].p90_ms

    @property
    def ort_ratio(self) -> float | None:
        """ORT INT8 / ORT FP32."""
        return _ratio(self.ms("ort_int8"), self.ms("ort_fp32"))

    @property
    def torchvision_ratio(self) -> float | None:
        """qz INT8 eager / torchvision INT8 eager (below 1 means qz's model is faster)."""
        return _ratio(self.ms("int8"), self.ms("tv_int8"))

    @property
    def ort_u8s8_key(self) -> str | None:
        """The faster of the timed ORT own U8S8 formats ("ort_u8s8_qdq" or "ort_u8s8_qop"), None if neither ran."""
        timed = [k for k in ("ort_u8s8_qdq", "ort_u8s8_qop") if k in self.latency]
        return min(timed, key=self.ms) if timed else None

    @property
    def ort_u8s8_format(self) -> str | None:
        """The format of the faster ORT own U8S8 file: "QDQ" or "QOperator"."""
        key = self.ort_u8s8_key
        return None if key is None else ORT_OWN[key][3]

    @property
    def ort_own_best_ms(self) -> float | None:
        """The fastest of onnxruntime's own INT8 files (S8S8 and U8S8 in either format), median ms."""
        timed = [self.ms(k) for k in ORT_OWN if k in self.latency]
        return min(timed) if timed else None

    @property
    def ort_own_ratio(self) -> float | None:
        """qz's ORT INT8 / the best ORT own INT8 (at most 1: qz's INT8 ONNX is at least as fast)."""
        return _ratio(self.ms("ort_int8"), self.ort_own_best_ms)

    @property
    def size_ratio(self) -> float | None:
        """INT8 / FP32 state-dict size."""
        return _ratio(self.int8_mb, self.fp32_mb)

    def as_dict(self) -> dict[str, Any]:
        """A flat record (one CSV row): medians and p10/p90 per runner, ratios, sizes, errors."""
        record: dict[str, Any] = {
            "model": self.model,
            "task": self.task,
            "family": self.family,
            "backend": self.backend,
            "batch_size": self.batch_size,
            "input_h": self.input_size[0],
            "input_w": self.input_size[1],
        }
        for key in RUNNERS:
            lat = self.latency.get(key)
            record[f"{key}_ms"] = lat.median_ms if lat else None
            record[f"{key}_p10_ms"] = lat.p10_ms if lat else None
            record[f"{key}_p90_ms"] = lat.p90_ms if lat else None
        record |= {
            "eager_ratio": self.eager_ratio,
            "deployed_ratio": self.deployed_ratio,
            "target": self.target,
            "meets_target": self.meets_target,
            "slower_than_torchvision": self.slower_than_torchvision,
            "ort_ratio": self.ort_ratio,
            "torchvision_ratio": self.torchvision_ratio,
            "ort_u8s8_ms": self.ms(self.ort_u8s8_key) if self.ort_u8s8_key else None,
            "ort_u8s8_format": self.ort_u8s8_format,
            "ort_own_best_ms": self.ort_own_best_ms,
            "ort_own_ratio": self.ort_own_ratio,
            "qz_as_fast_as_ort_own": None if self.ort_own_ratio is None else self.ort_own_ratio <= 1,
            "fp32_mb": self.fp32_mb,
            "int8_mb": self.int8_mb,
            "size_ratio": self.size_ratio,
            "fp32_onnx_mb": self.fp32_onnx_mb,
            "int8_onnx_mb": self.int8_onnx_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "start_rss_mb": self.start_rss_mb,
            "float_islands": self.float_islands,
            "rounds": max((lat.runs for lat in self.latency.values()), default=0),
            "seconds": self.seconds,
            "error": self.error,
            "notes": "; ".join(f"{k}: {v}" for k, v in self.notes.items()),
            "hotspots": "; ".join(f"{k}: {v}" for k, v in self.hotspots.items()),
        }
        return record


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _message(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].name})" if frames else ""
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}{where}"


def select_models(patterns: Sequence[str] = (), *, task: str | None = None, all_models: bool = False) -> list[str]:
    """The models a command runs on: names or wildcards, all of a task, or every registered model.

    Raises:
        QzError: nothing selected, an unknown name, or a wildcard that matches nothing.
    """
    if task is not None and task not in TASKS:
        raise invalid_choice("task", task, TASKS)
    if all_models and patterns:
        raise QzError("Pass model names or --all, not both.")
    if not patterns:
        if not all_models and task is None:
            raise QzError("Name models (wildcards allowed), or pass --task TASK or --all.")
        names = list_models(task=task)
        if not names:
            raise QzError(f"No model is registered{f' for task {task!r}' if task else ''}.")
        return names
    names: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = list_models(pattern, task=task)
            if not found:
                raise QzError(f"No registered model matches {pattern!r}{f' in task {task!r}' if task else ''}.")
        else:
            entry = get_model_entry(pattern)  # raises with near matches
            if task is not None and entry.task != task:
                raise QzError(f"Model {pattern!r} is a {entry.task} model, not {task}.")
            found = [pattern]
        names += [n for n in found if n not in names]
    return names


def reset_peak_rss() -> bool:
    """Returns freed heap to the OS, then resets the process's peak resident memory (Linux).

    Without the trim, memory the allocator kept from an earlier model would count in the next
    model's peak. False where the OS cannot reset the peak.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last ``reset_peak_rss`` on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def machine_info(threads: int, backend: str) -> dict[str, Any]:
    """What the numbers were measured on, saved beside them."""
    import onnxruntime

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
        "backend": backend,
    }


def torchvision_int8(
    name: str, state_dict: dict[str, Tensor], batches: Sequence[Tensor], backend: str, **kwargs: Any
) -> nn.Module:
    """torchvision's own quantizable ``name`` with the same float weights, calibrated and converted.

    It gets qz's qconfig for ``backend`` and the same calibration batches, so a latency
    difference comes from the model's structure, not from the quantization scheme.

    Raises:
        QzError: torchvision has no quantizable model of that name.
    """
    import torch.ao.quantization as tq
    from torchvision.models import quantization as tvq

    from qz_core.qconfig import make_qconfig

    if name not in TORCHVISION_QUANTIZABLE:
        raise invalid_choice("torchvision quantizable model", name, TORCHVISION_QUANTIZABLE)
    model = getattr(tvq, name)(weights=None, quantize=False, **kwargs)
    model.load_state_dict(state_dict)  # same torchvision keys: strict
    model.eval()
    model.fuse_model(is_qat=False)
    set_backend(backend)
    model.qconfig = make_qconfig(backend)
    tq.prepare(model, inplace=True)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    tq.convert(model, inplace=True)
    return model


def _bench_one(
    name: str,
    row: BenchRow,
    *,
    weights: str | None,
    calib_batches: int,
    threads: int,
    warmup: int,
    rounds: int,
    ort: bool,
    ort_quantize: bool,
    compare_torchvision: bool,
    work: Path,
    build_kwargs: dict[str, Any],
    budget_s: float | None = None,
) -> None:
    entry = get_model_entry(name)
    generator = torch.Generator().manual_seed(0)
    shape = (3, *row.input_size)
    batches = [torch.randn(2, *shape, generator=generator) for _ in range(max(calib_batches, 1))]
    x = torch.randn(row.batch_size, *shape, generator=generator)

    float_model = entry.builder(weights=weights, **build_kwargs).eval()
    if weights is None:
        estimate_bn_stats(float_model, batches)
    float_model.eval()
    row.fp32_mb = model_size_mb(float_model)
    state_dict = {k: v.clone() for k, v in float_model.state_dict().items()}
    checkpoint = work / f"{name}_fp32.pth"
    torch.save(state_dict, checkpoint)
    runners: dict[str, Callable[[], Any]] = {"fp32": lambda: float_model(x)}

    def note(key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is a result, reported in the row
            row.notes[key] = _message(exc)
            return None

    def ptq() -> nn.Module:
        model = entry.builder(weights=str(checkpoint), quantize=True, backend=row.backend, **build_kwargs)
        calibrate(model, batches[:calib_batches], progress=False)
        int8 = convert(model)
        with torch.no_grad():
            int8(x)
        return int8

    int8 = None
    try:
        int8 = ptq()
    except Exception as exc:  # noqa: BLE001 - reported as the row's error; FP32 is still timed
        row.error = f"INT8: {_message(exc)}"
    if int8 is not None:
        row.int8_mb = model_size_mb(int8)
        row.float_islands = count_float_islands(int8)
        runners["int8"] = lambda: int8(x)
    if ort:
        from qz_core.onnx_export import export_onnx

        for key, model in (("ort_fp32", float_model), ("ort_int8", int8)):
            if model is None:
                continue
            path = work / f"{name}_{key}.onnx"
            report = note(key, lambda m=model, p=path: export_onnx(m, p, x, check=False))
            session = None if report is None else note(key, lambda p=path: ort_session(p, threads))
            if session is not None:
                runners[key] = ort_runner(session, x)
                setattr(row, f"{key.removeprefix('ort_')}_onnx_mb", report.size_mb)
        fp32_path = work / f"{name}_ort_fp32.onnx"
        if ort_quantize and fp32_path.is_file():
            runners |= ort_own_runners(name, fp32_path, batches[:calib_batches], x, threads, note)
    if compare_torchvision:
        if name in TORCHVISION_QUANTIZABLE and entry.task == "classification":
            tv = note("tv_int8", lambda: torchvision_int8(name, state_dict, batches[:calib_batches], row.backend))
            if tv is not None:
                runners["tv_int8"] = lambda: tv(x)
        else:
            row.notes["tv_int8"] = NO_TORCHVISION_MODEL
    set_backend(row.backend)
    for key, lat in compare_latency(runners, warmup=warmup, rounds=rounds, threads=threads, budget_s=budget_s).items():
        row.latency[key] = lat
    if row.meets_target is False:  # say where the time goes, in both INT8 engines
        if int8 is not None:
            shares = note("profile", lambda: eager_op_profile(int8, x))
            if shares:
                row.hotspots["INT8 eager"] = describe_profile(shares)
        if "ort_int8" in runners:
            path = work / f"{name}_ort_int8.onnx"
            shares = note("profile", lambda: ort_op_profile(path, x, threads=threads))
            if shares:
                row.hotspots["ORT INT8"] = describe_profile(shares)


def run_benchmark(
    names: Iterable[str],
    *,
    batch_size: int = 1,
    threads: int = 1,
    rounds: int = 20,
    warmup: int = 3,
    weights: str | None = None,
    backend: str | None = None,
    ort: bool = True,
    ort_quantize: bool = False,
    compare_torchvision: bool = False,
    calib_batches: int = 4,
    input_size: tuple[int, int] | None = None,
    build_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    budget_s: float | None = None,
    on_row: Callable[[list[BenchRow]], Any] | None = None,
) -> list[BenchRow]:
    """Quantizes and times each model; a model that fails is a row with its error, and the run goes on.

    Args:
        names: registered model names.
        batch_size: images per timed call.
        threads: intra-op threads of PyTorch and onnxruntime alike.
        rounds: timed interleaved rounds (each runs every runner once).
        warmup: untimed calls of each runner first.
        weights: weights name or checkpoint path for every model; random weights (BatchNorm
            statistics re-estimated on random data) when None.
        backend: quantized engine; the platform's when None.
        ort: also time FP32 and INT8 ONNX in onnxruntime.
        ort_quantize: also quantize the FP32 ONNX file with onnxruntime's own ``quantize_static``
            (``ORT_OWN``: its S8S8 defaults, U8S8 per-channel QDQ and QOperator) on the same
            calibration batches, and time those files too (needs ``ort``).
        compare_torchvision: also time torchvision's own INT8 model where one exists.
        calib_batches: random calibration batches (of 2 images).
        input_size: (height, width) instead of each model's standard input size.
        build_kwargs: extra builder keywords for every model (e.g. ``num_classes``).
        budget_s: timing seconds per model; slow models get fewer rounds (at least 5).
        on_row: called with the rows so far after each model (to save results as they come).
    """
    names = list(names)
    for label, value in (("batch_size", batch_size), ("threads", threads), ("rounds", rounds)):
        if value < 1:
            raise QzError(f"{label} must be at least 1; got {value}.")
    if ort_quantize and not ort:
        raise QzError("ort_quantize needs ort=True: onnxruntime's own quantization starts from the FP32 ONNX file.")
    backend = resolve_backend(backend)
    timing_setup(threads)
    rows: list[BenchRow] = []
    bar = tqdm(names, desc="bench", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix(model=name)
        start = time.perf_counter()
        row = BenchRow(name, backend=backend, batch_size=batch_size)
        if reset_peak_rss():
            row.start_rss_mb = peak_rss_mb()  # right after a reset the peak is the current size
        try:
            entry = get_model_entry(name)
            row.task, row.family = entry.task, str(entry.meta.get("family", ""))
            row.target = float(entry.meta.get("deployed_ratio_target", DEFAULT_DEPLOYED_RATIO_TARGET))
            row.input_size = tuple(input_size or entry.input_size)
            with tempfile.TemporaryDirectory(prefix="qz-bench-") as work:
                _bench_one(
                    name,
                    row,
                    weights=weights,
                    calib_batches=calib_batches,
                    threads=threads,
                    warmup=warmup,
                    rounds=rounds,
                    ort=ort,
                    ort_quantize=ort_quantize,
                    compare_torchvision=compare_torchvision,
                    work=Path(work),
                    build_kwargs=dict(build_kwargs or {}),
                    budget_s=budget_s,
                )
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the sweep
            row.error = (f"{row.error}; " if row.error else "") + _message(exc)
        row.peak_rss_mb = peak_rss_mb()
        row.seconds = time.perf_counter() - start
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        gc.collect()
    return rows


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
    """``probe_model`` on each model (in a temporary folder each); the rows of the support table."""
    results = []
    bar = tqdm(list(names), desc="support", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix(model=name)
        with tempfile.TemporaryDirectory(prefix="qz-support-") as work:
            try:
                result = probe_model(
                    name,
                    engines=engines,
                    opset=opset,
                    onnx=onnx,
                    calib_batches=calib_batches,
                    work_dir=work,
                    build_kwargs=build_kwargs,
                )
            except Exception as exc:  # noqa: BLE001 - an unknown name or a probe crash is a row too
                entry_task = ""
                with contextlib.suppress(QzError):
                    entry_task = get_model_entry(name).task
                result = SupportResult(name, entry_task, opset=opset, errors={"probe": _message(exc)})
        results.append(result)
        gc.collect()
    return results
