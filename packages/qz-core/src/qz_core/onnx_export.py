"""ONNX export of FP32 and INT8 models, checked in onnxruntime against PyTorch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qz_core.errors import QzError
from qz_core.files import atomic_path
from qz_core.workflow import is_quantized, output_tensors


@dataclass(frozen=True)
class OnnxReport:
    """What an export produced and how closely onnxruntime agrees with PyTorch."""

    path: Path
    opset: int
    quantized: bool
    size_mb: float
    max_abs_diff: float | None
    mean_abs_diff: float | None
    output_range: float | None

    def __str__(self) -> str:
        kind = "INT8" if self.quantized else "FP32"
        text = f"{kind} ONNX {self.path} (opset {self.opset}, {self.size_mb:.2f} MB)"
        if self.max_abs_diff is not None:
            text += f": onnxruntime vs PyTorch max |diff| {self.max_abs_diff:.4g}, mean {self.mean_abs_diff:.4g}"
            text += f" (output range {self.output_range:.4g})"
        return text


# aten ops whose stock symbolic rejects quantized inputs, by the opset module their symbolic comes from:
# permute/transpose (a channels-last LayerNorm), gelu, slice (strided subsampling ``x[..., ::2, ::2]``),
# pad/constant_pad_nd (ZeroPad2d: padding with the zero point is padding with 0.0).
_QUANTIZED_PASSTHROUGH_OPS = {
    "permute": 9,
    "gelu": 9,
    "transpose": 9,
    "slice": 10,
    "pad": 11,
    "constant_pad_nd": 11,
}
_symbolics_registered = False


def _register_quantized_symbolics() -> None:
    """Lets the TorchScript exporter take quantized inputs in ops whose stock symbolics reject them.

    Wrapped in ``quantized_args`` they export as DequantizeLinear -> op -> QuantizeLinear with the
    input's scale, which is what PyTorch's quantized kernels compute; float inputs export as before.
    """
    global _symbolics_registered
    if _symbolics_registered:
        return
    import importlib

    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    for op, opset in _QUANTIZED_PASSTHROUGH_OPS.items():
        module = importlib.import_module(f"torch.onnx._internal.torchscript_exporter.symbolic_opset{opset}")
        symbolic = symbolic_helper.quantized_args(True)(getattr(module, op))
        torch.onnx.register_custom_op_symbolic(f"aten::{op}", symbolic, opset)
    # Quantized BatchNorm (a BN-ReLU with no conv before it, as in DenseNet) has no stock symbolic.
    torch.onnx.register_custom_op_symbolic("quantized::batch_norm2d", _quantized_batch_norm(relu=False), 10)
    torch.onnx.register_custom_op_symbolic("quantized::batch_norm2d_relu", _quantized_batch_norm(relu=True), 10)
    torch.onnx.register_custom_op_symbolic("quantized::hardswish", _quantized_hardswish, 10)
    _symbolics_registered = True


def _quantized_hardswish(g: Any, x: Any, scale: Any, zero_point: Any) -> Any:
    """Symbolic for quantized::hardswish that onnxruntime runs in integers: QLinearAdd, then QLinearMul.

    hardswish(x) = x * relu6(x + 3) / 6. ``x + 3`` is quantized with scale 6/255 and zero point 0,
    so QuantizeLinear's saturation is the relu6; read back with scale 1/255, the same bytes are
    relu6(x + 3) / 6. onnxruntime fuses DQ/DQ -> Add -> Q into QLinearAdd and DQ/DQ -> Mul -> Q into
    QLinearMul. The stock symbolic (DQ -> HardSwish -> Q) leaves a float island per activation,
    about a quarter of the INT8 time of a network built on hardswish. The extra rounding is 1/255
    of hardsigmoid's range.
    """
    from torch.onnx import symbolic_helper as sh

    def const(value: float | int, dtype: torch.dtype) -> Any:
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    x, _, _, _ = sh.dequantize_helper(g, x)
    three = g.op("DequantizeLinear", const(1, torch.uint8), const(3.0, torch.float32), const(0, torch.uint8))
    relu6 = g.op("QuantizeLinear", g.op("Add", x, three), const(6 / 255, torch.float32), const(0, torch.uint8))
    hardsigmoid = g.op("DequantizeLinear", relu6, const(1 / 255, torch.float32), const(0, torch.uint8))
    return sh.quantize_helper(g, g.op("Mul", x, hardsigmoid), scale, zero_point)


def _quantized_batch_norm(relu: bool) -> Callable[..., Any]:
    """Symbolic for quantized::batch_norm2d(_relu): one multiply-add per channel on the integers [-> Relu] -> Q.

    With ``k = weight / sqrt(var + eps)``, BatchNorm of the dequantized input ``(q - zp) * s`` is
    ``q * (s * k) + (bias - mean * k - zp * s * k)``, so the symbolic casts the integers to float and
    applies that per-channel affine (constants that exporters and runtimes fold). The plain form,
    DequantizeLinear -> BatchNormalization, crashes OpenVINO 2026.4 (segfault in compile_model) after a
    quantized Concat, as in densely connected blocks: Concat -> QuantizeLinear (zero point not 0) -> DequantizeLinear ->
    ... -> QuantizeLinear. Both compute the same values in float.
    """
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter.symbolic_helper import _unpack_quantized_tensor

    float32 = 1  # onnx.TensorProto.FLOAT

    @sh.parse_args("v", "v", "v", "v", "v", "f", "v", "v")
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float, scale: Any, zp: Any) -> Any:
        values, in_scale, in_zp = _unpack_quantized_tensor(x)[:3]
        eps_t = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
        k = g.op("Div", weight, g.op("Sqrt", g.op("Add", var, eps_t)))
        gain = g.op("Mul", k, g.op("Cast", in_scale, to_i=float32))
        shift = g.op(
            "Sub", g.op("Sub", bias, g.op("Mul", mean, k)), g.op("Mul", gain, g.op("Cast", in_zp, to_i=float32))
        )
        per_channel = g.op("Constant", value_t=torch.tensor([1, -1, 1, 1], dtype=torch.int64))
        out = g.op("Mul", g.op("Cast", values, to_i=float32), g.op("Reshape", gain, per_channel))
        out = g.op("Add", out, g.op("Reshape", shift, per_channel))
        return sh.quantize_helper(g, g.op("Relu", out) if relu else out, scale, zp)

    return symbolic


def _flatten(output: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in output_tensors(output)]


def run_onnx(path: str | os.PathLike, example_input: Tensor | tuple[Tensor, ...]) -> list[np.ndarray]:
    """Runs an ONNX file in onnxruntime on the CPU and returns its outputs."""
    import onnxruntime as ort

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


class _FlatOutputs(nn.Module):
    """Returns a model's output tensors as one flat tuple, in ``_flatten``'s order.

    The TorchScript exporter traces quantized models strictly, and a strict trace refuses dict
    outputs (``{"out", "aux"}``, lists of dicts). The graph is the same.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(output_tensors(self.model(*inputs)))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    opset: int = 13,
    check: bool = True,
    dynamic_batch: bool = False,
) -> OnnxReport:
    """Exports an FP32 or INT8 model to ONNX and, with ``check``, runs it in onnxruntime.

    INT8 models go through the TorchScript exporter (``dynamo=False``), which maps quantized
    ops to QuantizeLinear/DequantizeLinear around float ops (QDQ) that onnxruntime fuses back
    into integer kernels.
    """
    path = Path(path)
    model.eval()
    quantized = is_quantized(model)
    if quantized:
        _register_quantized_symbolics()
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    input_names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    dynamic_axes = {n: {0: "batch"} for n in input_names} if dynamic_batch else None
    with torch.no_grad():
        sample = model(*inputs)
    plain = isinstance(sample, Tensor) or (isinstance(sample, tuple) and all(isinstance(t, Tensor) for t in sample))
    exported = model if plain else _FlatOutputs(model).eval()
    with atomic_path(path) as tmp:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # qz uses the TorchScript exporter on purpose: the dynamo one cannot take quantized models.
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning
                )
                torch.onnx.export(
                    exported,
                    inputs,
                    os.fspath(tmp),
                    opset_version=opset,
                    input_names=input_names,
                    dynamic_axes=dynamic_axes,
                    dynamo=False,
                )
        except Exception as exc:
            raise QzError(f"ONNX export of {type(model).__name__} (opset {opset}) failed: {exc}") from exc
        size_mb = tmp.stat().st_size / 2**20
        got = run_onnx(tmp, tuple(inputs)) if check else None
    if got is None:
        return OnnxReport(path, opset, quantized, size_mb, None, None, None)
    max_diff, mean_diff, out_range = output_agreement(got, _flatten(sample), ("onnxruntime", "PyTorch"))
    return OnnxReport(path, opset, quantized, size_mb, max_diff, mean_diff, out_range)


def output_agreement(
    got: Sequence[np.ndarray], expected: Sequence[np.ndarray], runtimes: tuple[str, str]
) -> tuple[float, float, float]:
    """Max and mean |got - expected| over all paired outputs, and the widest expected output range.

    Raises:
        QzError: the two runtimes (named by ``runtimes``) returned different numbers of outputs.
    """
    if len(got) != len(expected):
        raise QzError(f"{runtimes[0]} returned {len(got)} outputs, {runtimes[1]} {len(expected)}.")
    diffs = [np.abs(g.astype(np.float64) - e.astype(np.float64)).ravel() for g, e in zip(got, expected, strict=True)]
    flat = np.concatenate(diffs) if diffs else np.zeros(0)
    out_range = max((float(np.ptp(e)) for e in expected if e.size), default=0.0)
    return float(flat.max(initial=0.0)), float(flat.mean()) if flat.size else 0.0, out_range
