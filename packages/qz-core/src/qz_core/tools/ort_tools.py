"""onnxruntime side of the benchmark: sessions, its own ``quantize_static``, and where the time goes.

``ORT_OWN`` configures onnxruntime's own INT8 quantization of an FP32 ONNX file, so qz's INT8
export can be timed against ORT's best own file. ``ort_op_profile`` splits an ONNX model's run
time by kind of operator (1x1, kxk, depthwise and grouped convolutions apart), which is what the
benchmark prints when a model misses its target.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from qz_core.errors import invalid_choice
from qz_core.files import atomic_path

# onnxruntime.quantization.quantize_static settings, by runner key: (activation, weight, per_channel, format).
# S8S8 is quantize_static's defaults; U8S8 per-channel is ORT's advice for x86 (reduce_range off: VNNI
# CPUs do not saturate), in both formats since which one is faster depends on the model and CPU.
ORT_OWN = {
    "ort_s8s8": ("QInt8", "QInt8", False, "QDQ"),
    "ort_u8s8_qdq": ("QUInt8", "QInt8", True, "QDQ"),
    "ort_u8s8_qop": ("QUInt8", "QInt8", True, "QOperator"),
}


def ort_session(path: str | os.PathLike, threads: int, *, profile_prefix: str | None = None, **config: str) -> Any:
    """An onnxruntime CPU session: ``threads`` intra-op threads, all graph optimizations, no spinning.

    Spinning worker threads would keep burning CPU after a run and slow the next runner of an
    interleaved round, so they are turned off.

    Args:
        profile_prefix: turn on onnxruntime's profiler, writing to files with this prefix.
        **config: extra session settings: ``optimized_model_filepath`` or session config entries.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if "optimized_model_filepath" in config:
        options.optimized_model_filepath = config.pop("optimized_model_filepath")
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: Any, x: Tensor) -> Callable[[], Any]:
    """A zero-argument callable that runs ``session`` on ``x`` once."""
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feeds)


def _node_kinds(model_path: Path) -> dict[str, str]:
    """Node name -> kind (the op type; convolutions split into 1x1, kxk, depthwise and grouped)."""
    import onnx

    graph = onnx.load(os.fspath(model_path)).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    kinds = {}
    for node in graph.node:
        kind = node.op_type
        if kind in ("Conv", "QLinearConv", "ConvInteger", "FusedConv", "NchwcConv"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            groups = int(attrs.get("group", 1))
            weight = shapes.get(node.input[3 if kind == "QLinearConv" else 1], ())
            kernel = tuple(attrs.get("kernel_shape", weight[2:] if len(weight) > 2 else ()))
            size = "x".join(map(str, kernel)) or "?"
            if groups == 1:
                kind = f"{kind} {size}"
            elif len(weight) > 1 and weight[1] == 1:
                kind = f"{kind} depthwise {size}"
            else:
                per_group = f", {weight[1]} ch/group" if len(weight) > 1 else ""
                kind = f"{kind} grouped {size}{per_group}"
        kinds[node.name] = kind
    return kinds


def ort_op_profile(
    path: str | os.PathLike, x: Tensor, *, threads: int = 1, runs: int = 20, warmup: int = 5
) -> dict[str, float]:
    """Share of onnxruntime's kernel time per kind of operator, largest first (shares sum to 1).

    Runs ``path`` (after onnxruntime's graph optimizations, so fused QLinear kernels are what is
    counted) ``warmup + runs`` times on ``x`` with the profiler on, and counts the last ``runs``:
    the first runs of a session pack weights and allocate, and would inflate the early layers.
    """
    with tempfile.TemporaryDirectory(prefix="qz-ort-profile-") as work:
        optimized = Path(work) / "optimized.onnx"
        session = ort_session(
            path, threads, profile_prefix=str(Path(work) / "profile"), optimized_model_filepath=str(optimized)
        )
        run = ort_runner(session, x)
        for _ in range(warmup + runs):
            run()
        events = json.loads(Path(session.end_profiling()).read_text())
        kinds = _node_kinds(optimized)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted_from = starts[warmup] if len(starts) > warmup else 0
    per_kind: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and event["ts"] >= counted_from:
            node = name.removesuffix("_kernel_time")
            per_kind[kinds.get(node, event.get("args", {}).get("op_name", node))] += event["dur"]
    total = sum(per_kind.values())
    return {kind: dur / total for kind, dur in per_kind.most_common()} if total else {}


def describe_profile(shares: dict[str, float], top: int = 4) -> str:
    """``'QLinearConv 3x3 48%, QLinearConv grouped 3x3, 8 ch/group 40%, ...'``: the largest shares."""
    return ", ".join(f"{kind} {share:.0%}" for kind, share in list(shares.items())[:top])


class _CalibrationReader:
    """An onnxruntime ``CalibrationDataReader`` (duck-typed: it checks for ``get_next``) over tensors.

    Batches are cut to the model's fixed batch size, so the FP32 file exported at batch 1 sees the
    same images qz's PTQ calibrated on.
    """

    def __init__(self, input_name: str, batch_dim: Any, batches: Sequence[Tensor]) -> None:
        if isinstance(batch_dim, int) and batch_dim > 0:
            batches = [b for batch in batches for b in batch.split(batch_dim) if len(b) == batch_dim]
        self._feeds = iter([{input_name: b.numpy()} for b in batches])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def ort_quantize(
    fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches: Sequence[Tensor], key: str
) -> Path:
    """Quantizes an FP32 ONNX file with onnxruntime's ``quantize_static`` as configured in ``ORT_OWN[key]``.

    Calibration is MinMax (quantize_static's default) on ``batches``; returns ``out_path``.

    Raises:
        QzError: ``key`` is not in ``ORT_OWN``.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if key not in ORT_OWN:
        raise invalid_choice("onnxruntime quantization", key, ORT_OWN)
    activation, weight, per_channel, quant_format = ORT_OWN[key]
    graph_input = onnx.load(os.fspath(fp32_path), load_external_data=False).graph.input[0]
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    reader = _CalibrationReader(graph_input.name, batch_dim.dim_value or None, batches)
    with atomic_path(out_path) as tmp:
        quantize_static(
            os.fspath(fp32_path),
            os.fspath(tmp),
            reader,
            quant_format=getattr(QuantFormat, quant_format),
            per_channel=per_channel,
            activation_type=getattr(QuantType, activation),
            weight_type=getattr(QuantType, weight),
        )
    return Path(out_path)


def ort_own_runners(
    name: str, fp32_path: Path, batches: Sequence[Tensor], x: Tensor, threads: int, note: Callable[..., Any]
) -> dict[str, Callable[[], Any]]:
    """onnxruntime's own INT8 files of ``fp32_path``, as runners; a failed step is a note under its key."""
    from onnxruntime.quantization import quant_pre_process

    def pre_process() -> Path:  # shape inference + optimization before quantizing, as ORT advises
        out = fp32_path.with_name(f"{name}_ort_pre.onnx")
        with atomic_path(out) as tmp:
            quant_pre_process(os.fspath(fp32_path), os.fspath(tmp))
        return out

    source = note("ort_pre_process", pre_process) or fp32_path
    runners = {}
    for key in ORT_OWN:
        path = note(key, lambda k=key: ort_quantize(source, fp32_path.with_name(f"{name}_{k}.onnx"), batches, k))
        session = None if path is None else note(key, lambda p=path: ort_session(p, threads))
        if session is not None:
            runners[key] = ort_runner(session, x)
    return runners
