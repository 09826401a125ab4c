"""The benchmark run: every selected model quantized and timed, in one process.

``run_benchmark`` builds each model (random weights settled by its task, or given weights),
PTQ-calibrates and converts it, exports the task's export module in FP32 and INT8 to ONNX, then
times FP32 eager, INT8 eager, FP32 and INT8 in onnxruntime (and torchvision's own INT8 model where
one of the same name exists) interleaved, round by round, so machine drift hits all alike. With
``ort_quantize`` it also quantizes the FP32 ONNX file with onnxruntime's own ``quantize_static``
(``ORT_OWN``) and times those files in the same rounds. With ``openvino`` it also compiles the same FP32
and INT8 ONNX files with OpenVINO (each checked in a child process first, so a crash is the row's note)
and times them in the same rounds. With the ``nncf`` anchor it also quantizes the same float model (the
task's export module) with NNCF on the same calibration batches and times NNCF's model in OpenVINO in the
same rounds. Around each model's timing it reads the load average and how many cores other processes
kept busy, so that rows timed on a busy machine are flagged (``BenchRow.busy``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qz_core.backend import resolve_backend, set_backend
from qz_core.errors import QzError, invalid_choice
from qz_core.files import write_atomic
from qz_core.measure import compare_latency, eager_op_profile, model_size_mb, timing_state
from qz_core.partial import count_float_islands
from qz_core.registry import get_model_builder, get_model_spec, get_task
from qz_core.tools.bench.anchors import check_anchors, nncf_openvino_ir
from qz_core.tools.bench.results import NO_TORCHVISION_MODEL, BenchRow, is_busy
from qz_core.tools.common import describe_error
from qz_core.tools.ort_tools import describe_profile, ort_op_profile, ort_own_runners, ort_runner, ort_session
from qz_core.workflow import calibrate, convert

TORCHVISION_PREFIX = "quantized_"  # torchvision registers its quantizable builders as quantized_<name>


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


@dataclass(frozen=True)
class CpuSample:
    """A moment's CPU counters: wall clock, the machine's busy CPU seconds (all cores), this process's CPU seconds."""

    wall_s: float
    machine_busy_s: float
    own_s: float


def cpu_sample() -> CpuSample | None:
    """The CPU counters now, from ``/proc/stat`` (None where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle and iowait; steal (fields[7]) is another guest's work: busy
    busy_s = (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")
    return CpuSample(time.monotonic(), busy_s, time.process_time())


def other_cores(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """How many cores other processes kept busy on average between two samples (None without both)."""
    if before is None or after is None or after.wall_s <= before.wall_s:
        return None
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(others, 0.0) / (after.wall_s - before.wall_s)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def torchvision_quantizable() -> list[str]:
    """Names of the models torchvision has its own quantizable builder of (``resnet18``, ...)."""
    from torchvision.models import list_models
    from torchvision.models import quantization as tvq

    return [name.removeprefix(TORCHVISION_PREFIX) for name in list_models(module=tvq)]


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
    from torchvision.models import get_model_builder as torchvision_builder

    from qz_core.qconfig import make_qconfig

    if name not in torchvision_quantizable():
        raise invalid_choice("torchvision quantizable model", name, torchvision_quantizable())
    model = torchvision_builder(TORCHVISION_PREFIX + name)(weights=None, quantize=False, **kwargs)
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


@dataclass(frozen=True)
class _Settings:
    """``run_benchmark``'s options, as each model's run sees them."""

    batch_size: int
    threads: int
    rounds: int
    warmup: int
    weights: str | None
    ort: bool
    ort_quantize: bool
    openvino: bool
    anchors: tuple[str, ...]
    compare_torchvision: bool
    calib_batches: int
    input_size: tuple[int, int] | None
    build_kwargs: dict[str, Any]
    budget_s: float | None


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class _Run:
    """One model's run: its inputs, its models and what gets timed."""

    name: str
    row: BenchRow
    settings: _Settings
    work: Path
    x: Any = None
    batches: list[Any] = field(default_factory=list)
    float_model: nn.Module | None = None
    runners: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def note(self, key: str, fn: Callable[[], Any]) -> Any:
        """Runs ``fn``; a failure becomes the row's note under ``key`` and returns None."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is a result, reported in the row
            self.row.notes[key] = describe_error(exc)
            return None

    @property
    def calibration(self) -> list[Any]:
        return self.batches[: self.settings.calib_batches]


def _float_model(run: _Run, builder: Callable[..., nn.Module], settle: Callable[..., None]) -> Path:
    """Builds the float model, times it as "fp32", and saves its weights for the INT8 build."""
    s = run.settings
    model = builder(weights=s.weights, **s.build_kwargs).eval()
    if s.weights is None:
        settle(model, run.batches)
    model.eval()
    run.row.fp32_mb = model_size_mb(model)
    checkpoint = run.work / f"{run.name}_fp32.pth"
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    write_atomic(checkpoint, lambda file: torch.save(state_dict, file))
    run.runners["fp32"] = lambda: model(run.x)
    run.float_model = model
    return checkpoint


def _int8_model(run: _Run, builder: Callable[..., nn.Module], checkpoint: Path) -> nn.Module | None:
    """PTQ from the saved float weights; a failure is the row's error (FP32 is still timed)."""
    try:
        model = builder(weights=str(checkpoint), quantize=True, backend=run.row.backend, **run.settings.build_kwargs)
        calibrate(model, run.calibration, progress=False, inputs=_identity)
        int8 = convert(model)
        with torch.no_grad():
            int8(run.x)
    except Exception as exc:  # noqa: BLE001 - reported as the row's error
        run.row.error = f"INT8: {describe_error(exc)}"
        return None
    run.row.int8_mb = model_size_mb(int8)
    run.row.float_islands = count_float_islands(int8)
    run.runners["int8"] = lambda: int8(run.x)
    return int8


def _onnx_files(run: _Run, export_module: Callable[[nn.Module], nn.Module], int8: nn.Module | None) -> dict[str, Path]:
    """Exports the FP32 and INT8 export modules to ONNX: "fp32"/"int8" -> file; a failed export is a note."""
    from qz_core.onnx_export import export_onnx

    engine = "ort" if run.settings.ort else "ov"
    run.row.ort_partial = export_module(run.float_model) is not run.float_model
    paths = {}
    for kind, model in (("fp32", run.float_model), ("int8", int8)):
        if model is None:
            continue
        path = run.work / f"{run.name}_ort_{kind}.onnx"
        report = run.note(
            f"{engine}_{kind}", lambda m=model, p=path: export_onnx(export_module(m), p, run.x, check=False)
        )
        if report is not None:
            paths[kind] = path
            setattr(run.row, f"{kind}_onnx_mb", report.size_mb)
    return paths


def _ort_runners(run: _Run, paths: dict[str, Path]) -> None:
    """Adds the onnxruntime sessions of the exported ONNX files (and of ORT's own INT8 files)."""
    threads = run.settings.threads
    for kind, path in paths.items():
        session = run.note(f"ort_{kind}", lambda p=path: ort_session(p, threads))
        if session is not None:
            run.runners[f"ort_{kind}"] = ort_runner(session, run.x)
    if run.settings.ort_quantize and "fp32" in paths:
        run.runners |= ort_own_runners(run.name, paths["fp32"], run.calibration, run.x, threads, run.note)


def _ov_runners(run: _Run, paths: dict[str, Path]) -> None:
    """Adds OpenVINO's compiled models of the exported ONNX files; a crash or failure is a note under its key."""
    from qz_core.openvino_runtime import describe_precisions, ov_checked_compile, ov_runner, precision_counts

    for kind, path in paths.items():
        compiled = run.note(f"ov_{kind}", lambda p=path: ov_checked_compile(p, run.settings.threads))
        if compiled is not None:
            run.runners[f"ov_{kind}"] = ov_runner(compiled, run.x)
            if kind == "int8":
                run.row.ov_int8_precision = describe_precisions(precision_counts(compiled))


def _nncf_runner(run: _Run, export_module: Callable[[nn.Module], nn.Module]) -> None:
    """NNCF's INT8 of the float export module, on the same calibration batches, compiled in OpenVINO."""
    from qz_core.openvino_runtime import describe_precisions, ov_checked_compile, ov_runner, precision_counts

    def compile_nncf() -> Any:
        xml = run.work / f"{run.name}_nncf.xml"
        nncf_openvino_ir(export_module(run.float_model), run.calibration, run.x, xml)
        return ov_checked_compile(xml, run.settings.threads)

    compiled = run.note("nncf_int8", compile_nncf)
    if compiled is not None:
        run.runners["nncf_int8"] = ov_runner(compiled, run.x)
        run.row.nncf_int8_precision = describe_precisions(precision_counts(compiled))


def _timed(run: _Run) -> None:
    """Times the runners interleaved, and whether other work ran meanwhile."""
    s, row = run.settings, run.row
    set_backend(row.backend)
    row.load_average, before = load_average(), cpu_sample()
    timed = compare_latency(run.runners, warmup=s.warmup, rounds=s.rounds, threads=s.threads, budget_s=s.budget_s)
    row.other_cores = other_cores(before, cpu_sample())
    row.busy = is_busy(row.load_average, row.other_cores, s.threads)
    row.latency.update(timed)


def _torchvision_runner(run: _Run) -> None:
    """torchvision's own INT8 model of the same name and weights, where torchvision has one."""
    if run.name not in torchvision_quantizable():
        run.row.notes["tv_int8"] = NO_TORCHVISION_MODEL
        return
    state_dict = run.float_model.state_dict()
    tv = run.note("tv_int8", lambda: torchvision_int8(run.name, state_dict, run.calibration, run.row.backend))
    if tv is not None:
        run.runners["tv_int8"] = lambda: tv(run.x)


def _profile_miss(run: _Run, int8: nn.Module | None) -> None:
    """Says where the INT8 time goes, in both INT8 engines, for a model that misses its target."""
    if int8 is not None:
        shares = run.note("profile", lambda: eager_op_profile(int8, run.x))
        if shares:
            run.row.hotspots["INT8 eager"] = describe_profile(shares)
    if "ort_int8" in run.runners:
        path = run.work / f"{run.name}_ort_int8.onnx"
        shares = run.note("profile", lambda: ort_op_profile(path, run.x, threads=run.settings.threads))
        if shares:
            run.row.hotspots["ORT INT8"] = describe_profile(shares)


def _bench_one(run: _Run) -> None:
    spec = get_model_spec(run.name)
    task = get_task(spec.task)
    builder = get_model_builder(run.name)
    shaped = spec.variant(input_size=run.row.input_size)
    run.batches = [task.example_input(shaped, 2) for _ in range(max(run.settings.calib_batches, 1))]
    run.x = task.example_input(shaped, run.row.batch_size)
    checkpoint = _float_model(run, builder, task.settle_random_weights)
    int8 = _int8_model(run, builder, checkpoint)
    if run.settings.ort or run.settings.openvino:
        paths = _onnx_files(run, task.export_module, int8)
        if run.settings.ort:
            _ort_runners(run, paths)
        if run.settings.openvino:
            _ov_runners(run, paths)
    if "nncf" in run.settings.anchors and run.float_model is not None:
        _nncf_runner(run, task.export_module)
    if run.settings.compare_torchvision:
        _torchvision_runner(run)
    _timed(run)
    if run.row.meets_target is False:
        _profile_miss(run, int8)


def _check(
    batch_size: int, threads: int, rounds: int, ort: bool, ort_quantize: bool, openvino: bool, anchors: Sequence[str]
) -> None:
    for label, value in (("batch_size", batch_size), ("threads", threads), ("rounds", rounds)):
        if value < 1:
            raise QzError(f"{label} must be at least 1; got {value}.")
    if ort_quantize and not ort:
        raise QzError("ort_quantize needs ort=True: onnxruntime's own quantization starts from the FP32 ONNX file.")
    if openvino:
        from qz_core.openvino_runtime import import_openvino

        import_openvino()
    check_anchors(anchors)


def _measure(name: str, settings: _Settings, backend: str) -> BenchRow:
    """One model's row; a failure is the row's error."""
    start = time.perf_counter()
    row = BenchRow(name, backend=backend, batch_size=settings.batch_size)
    if reset_peak_rss():
        row.start_rss_mb = peak_rss_mb()  # right after a reset the peak is the current size
    try:
        spec = get_model_spec(name)
        row.task, row.family = spec.task, spec.family
        row.target = float(spec.deployed_ratio_target)
        row.input_size = tuple(settings.input_size or spec.input_size)
        with tempfile.TemporaryDirectory(prefix="qz-bench-") as work, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _bench_one(_Run(name, row, settings, Path(work)))
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the sweep
        row.error = (f"{row.error}; " if row.error else "") + describe_error(exc)
    row.peak_rss_mb = peak_rss_mb()
    row.seconds = time.perf_counter() - start
    return row


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
    openvino: bool = False,
    anchors: Sequence[str] = (),
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
        threads: intra-op threads of PyTorch, onnxruntime and OpenVINO alike.
        rounds: timed interleaved rounds (each runs every runner once).
        warmup: untimed calls of each runner first.
        weights: weights name or checkpoint path for every model; random weights (settled by the
            model's task: BatchNorm statistics re-estimated on random inputs) when None.
        backend: quantized engine; the platform's when None.
        ort: also time the FP32 and INT8 export modules as ONNX in onnxruntime.
        ort_quantize: also quantize the FP32 ONNX file with onnxruntime's own ``quantize_static``
            (``ORT_OWN``: its S8S8 defaults, U8S8 per-channel QDQ and QOperator) on the same
            calibration batches, and time those files too (needs ``ort``).
        openvino: also compile the FP32 and INT8 ONNX files with OpenVINO (CPU, ``threads`` threads,
            latency hint) and time them; a model OpenVINO crashes or fails on gets a note, not an error.
        anchors: other quantizers to time beside qz (``ANCHORS``): "nncf" quantizes the float export module
            with NNCF on the same calibration batches and times it in OpenVINO (and turns ``openvino`` on,
            so qz's INT8 runs there too); a model NNCF fails on gets a note under "nncf_int8".
        compare_torchvision: also time torchvision's own INT8 model of the same name where one exists.
        calib_batches: random calibration batches (of 2 inputs).
        input_size: (height, width) instead of each model's standard input size.
        build_kwargs: extra builder keywords for every model (e.g. ``num_classes``).
        progress: show a progress bar.
        budget_s: timing seconds per model; slow models get fewer rounds (at least 5).
        on_row: called with the rows so far after each model (to save results as they come).

    Raises:
        QzError: a count below 1, ``ort_quantize`` without ``ort``, ``openvino`` without OpenVINO installed,
            or an unknown anchor or one not installed.
    """
    anchors = tuple(dict.fromkeys(anchors))
    openvino = openvino or "nncf" in anchors
    _check(batch_size, threads, rounds, ort, ort_quantize, openvino, anchors)
    backend = resolve_backend(backend)
    with timing_state(threads):
        settings = _Settings(
            batch_size,
            threads,
            rounds,
            warmup,
            weights,
            ort,
            ort_quantize,
            openvino,
            anchors,
            compare_torchvision,
            calib_batches,
            input_size,
            dict(build_kwargs or {}),
            budget_s,
        )
        rows: list[BenchRow] = []
        bar = tqdm(list(names), desc="bench", unit="model", disable=not progress)
        for name in bar:
            bar.set_postfix(model=name)
            rows.append(_measure(name, settings, backend))
            if on_row is not None:
                on_row(rows)
            gc.collect()
        return rows
