"""OpenVINO side of deployment: compile an ONNX or IR file on the CPU, run it, and say what precision it runs in.

OpenVINO is optional (``pip install 'qz-core[openvino]'``) and imported only when used. It can crash
(a segfault) compiling some graphs, so ``check_compiles`` compiles a file in a child process first:
the crash becomes a ``QzError`` instead of taking qz down with it. ``write_openvino_ir`` turns an ONNX
file into OpenVINO IR (.xml + .bin), checked against onnxruntime.

``precision_counts`` reads the compiled model's runtime graph (the kernels OpenVINO picked, with
their ``runtimePrecision``), which tells a real INT8 graph (u8/i8 convolutions) from one that
dequantizes everything and runs in float.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from qz_core.errors import QzError

OPENVINO_MISSING = "OpenVINO is not installed: pip install 'qz-core[openvino]'"
INTEGER_PRECISIONS = ("u8", "i8")
# Runtime layer types that do the multiply-accumulate work: where INT8 pays off.
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")

# The child's whole program: import OpenVINO alone (not torch) and compile; a crash kills only the child.
_COMPILE_CHILD = """
import sys
import openvino as ov
ov.Core().compile_model(sys.argv[1], "CPU", {"INFERENCE_NUM_THREADS": int(sys.argv[2]),
                                             "INFERENCE_PRECISION_HINT": "f32"})
"""


def import_openvino() -> Any:
    """The ``openvino`` module.

    Raises:
        QzError: OpenVINO is not installed (one line saying how to install it).
    """
    try:
        import openvino
    except ImportError:
        raise QzError(OPENVINO_MISSING) from None
    return openvino


def openvino_version() -> str | None:
    """OpenVINO's version, None when it is not installed."""
    try:
        return import_openvino().get_version()
    except QzError:
        return None


def ov_compile(path: str | os.PathLike, threads: int | None = 1, *, precision: str = "f32") -> Any:
    """Compiles an ONNX or IR file for OpenVINO's CPU plugin, tuned for latency.

    Args:
        threads: inference threads; OpenVINO's choice when None.
        precision: the precision of float layers. "f32" keeps FP32 as FP32 (OpenVINO's default
            on CPUs with bf16 support is bf16), so it compares with onnxruntime and PyTorch.
    """
    ov = import_openvino()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(os.fspath(path), "CPU", config)


def _feeds(compiled: Any, inputs: Tensor | np.ndarray | Sequence[Tensor | np.ndarray]) -> dict[int, np.ndarray]:
    items = inputs if isinstance(inputs, (list, tuple)) else (inputs,)
    arrays = [t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t) for t in items]
    if len(arrays) != len(compiled.inputs):
        raise QzError(f"The OpenVINO model takes {len(compiled.inputs)} inputs; got {len(arrays)}.")
    return dict(enumerate(arrays))


def ov_run(compiled: Any, inputs: Tensor | np.ndarray | Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
    """Runs a compiled model once; its outputs in order, as numpy arrays."""
    result = compiled.create_infer_request().infer(_feeds(compiled, inputs))
    return [np.array(result[output]) for output in compiled.outputs]


def ov_runner(compiled: Any, x: Tensor) -> Callable[[], Any]:
    """A zero-argument callable that runs ``compiled`` on ``x`` once (one reused infer request)."""
    request = compiled.create_infer_request()
    feeds = _feeds(compiled, x)
    return lambda: request.infer(feeds)


def precision_counts(compiled: Any) -> dict[str, dict[str, int]]:
    """Layer type -> runtime precision -> how many layers of the compiled model run so.

    ``{"Convolution": {"u8": 53}, "Eltwise": {"f32": 2}, ...}``, from the runtime model's
    ``layerType`` and ``runtimePrecision``.
    """
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "runtimePrecision" in info:
            counts[info["layerType"].astype(str)][info["runtimePrecision"].astype(str)] += 1
    return {layer: dict(by_precision) for layer, by_precision in sorted(counts.items())}


def compute_precisions(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Precision -> number of compute layers (convolutions, fully connected, matmuls) that run in it."""
    total: collections.Counter[str] = collections.Counter()
    for layer in COMPUTE_LAYERS:
        total.update(counts.get(layer, {}))
    return dict(total.most_common())


def runs_int8(counts: dict[str, dict[str, int]]) -> bool:
    """Whether any compute layer runs in integers (u8/i8): a real INT8 graph, not dequantize-then-float."""
    return any(p in INTEGER_PRECISIONS for p in compute_precisions(counts))


def describe_precisions(counts: dict[str, dict[str, int]]) -> str:
    """``'u8 53, f32 1'``: how many compute layers run in each precision (``'none'`` without any)."""
    return ", ".join(f"{p} {n}" for p, n in compute_precisions(counts).items()) or "none"


def run_guarded(argv: Sequence[str], what: str, *, timeout_s: float = 600) -> None:
    """Runs ``argv`` as a child process; a crash or failure of the child becomes a ``QzError``.

    Raises:
        QzError: ``"OpenVINO crashed {what} (signal 11)"`` when a signal killed the child, the
            last line of its error output when it failed, or a timeout.
    """
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise QzError(f"OpenVINO hung {what} (no result after {timeout_s:g} s).") from None
    if done.returncode < 0:
        code = -done.returncode
        name = signal.Signals(code).name if code in signal.valid_signals() else "unknown"
        raise QzError(f"OpenVINO crashed {what} (signal {code}, {name}).")
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise QzError(f"OpenVINO failed {what}: {lines[-1] if lines else f'exit status {done.returncode}'}")


def check_compiles(path: str | os.PathLike, threads: int | None = 1) -> None:
    """Compiles ``path`` with OpenVINO in a child process, so that a segfault cannot take this process down.

    Raises:
        QzError: OpenVINO is missing, crashed or failed compiling ``path``.
    """
    import_openvino()
    argv = [sys.executable, "-c", _COMPILE_CHILD, os.fspath(path), str(threads or 0)]
    run_guarded(argv, f"compiling {os.fspath(path)}")


def ov_checked_compile(path: str | os.PathLike, threads: int | None = 1) -> Any:
    """``check_compiles`` then ``ov_compile``: a compiled model, or a ``QzError`` instead of a crash."""
    check_compiles(path, threads)
    return ov_compile(path, threads)


@dataclass(frozen=True)
class OpenVinoReport:
    """What an IR export wrote, what OpenVINO runs it in, and how closely it agrees with onnxruntime."""

    path: Path
    quantized: bool
    size_mb: float
    precisions: str
    max_abs_diff: float
    mean_abs_diff: float
    output_range: float

    def __str__(self) -> str:
        kind = "INT8" if self.quantized else "FP32"
        return (
            f"{kind} OpenVINO IR {self.path} (+ .bin, {self.size_mb:.2f} MB; compute layers {self.precisions}): "
            f"OpenVINO vs onnxruntime max |diff| {self.max_abs_diff:.4g}, mean {self.mean_abs_diff:.4g} "
            f"(output range {self.output_range:.4g})"
        )


def write_openvino_ir(
    onnx_path: str | os.PathLike,
    xml_path: str | os.PathLike,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    quantized: bool,
) -> OpenVinoReport:
    """Converts an ONNX file to OpenVINO IR (``xml_path`` and the .bin beside it), whole or not at all.

    The IR is written into a temporary folder beside ``xml_path``, compiled (in a child process
    first, so that a crash is an error), run on ``example_input`` and compared with onnxruntime's
    output of the ONNX file; only then are the .bin and .xml renamed into place. Weights keep their
    precision (no FP16 compression).

    Raises:
        QzError: OpenVINO is missing, or crashed or failed on the IR.
    """
    from qz_core.onnx_export import output_agreement, run_onnx

    ov = import_openvino()
    target = Path(xml_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.stem}.", dir=target.parent) as work:
        tmp_xml = Path(work) / target.name
        ov.save_model(ov.convert_model(os.fspath(onnx_path)), os.fspath(tmp_xml), compress_to_fp16=False)
        compiled = ov_checked_compile(tmp_xml, threads=None)
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        expected = run_onnx(onnx_path, example_input)
        agreement = output_agreement(ov_run(compiled, inputs), expected, ("OpenVINO", "onnxruntime"))
        max_diff, mean_diff, out_range = agreement
        precisions = describe_precisions(precision_counts(compiled))
        size_mb = (tmp_xml.stat().st_size + tmp_xml.with_suffix(".bin").stat().st_size) / 2**20
        del compiled
        os.replace(tmp_xml.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(tmp_xml, target)
    return OpenVinoReport(target, quantized, size_mb, precisions, max_diff, mean_diff, out_range)
