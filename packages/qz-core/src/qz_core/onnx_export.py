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
    torch.onnx.register_custom_op_symbolic("quantized::relu6", _quantized_relu6, 10)
    torch.onnx.register_custom_op_symbolic("aten::hardsigmoid", _hardsigmoid, 9)
    for opset in (9, 18):  # the opsets whose modules define a stock aten::mean
        torch.onnx.register_custom_op_symbolic("aten::mean", _mean(), opset)
    _symbolics_registered = True


def _is_quantized_value(value: Any) -> bool:
    """Whether a symbolic's argument is a quantized tensor: the exporter's (values, scale, zero point) tuple."""
    from torch.onnx._internal.torchscript_exporter.symbolic_helper import _is_tuple_construct, _is_value

    return _is_value(value) and _is_tuple_construct(value)


def _constant(g: Any, value: float | int, dtype: torch.dtype) -> Any:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _quantized_tuple(g: Any, values: Any, scale: float, zero_point: int) -> Any:
    """The exporter's quantized tensor: uint8 ``values`` read with ``scale`` and ``zero_point``."""
    return g.op(
        "prim::TupleConstruct", values, _constant(g, scale, torch.float32), _constant(g, zero_point, torch.uint8)
    )


def _hardsigmoid(g: Any, x: Any) -> Any:
    """Symbolic for aten::hardsigmoid that runs a quantized input as one integer add (QLinearAdd).

    PyTorch's quantized hardsigmoid outputs scale 1/256, zero point 0. ``x + 3`` quantized with scale
    6/256 and zero point 0 holds the same bytes: QuantizeLinear's saturation is the clamp to [0, 6], and
    read with scale 1/256 they are ``clamp(x + 3, 0, 6) / 6``. onnxruntime fuses DQ/DQ -> Add -> Q into
    QLinearAdd and OpenVINO runs it in u8; the stock symbolic (DQ -> HardSigmoid -> Q) runs in float
    in both. Float inputs export as before.
    """
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset9

    if not _is_quantized_value(x):
        return symbolic_opset9.hardsigmoid(g, x)
    x, _, _, _ = sh.dequantize_helper(g, x)
    three = g.op(
        "DequantizeLinear",
        _constant(g, 1, torch.uint8),
        _constant(g, 3.0, torch.float32),
        _constant(g, 0, torch.uint8),
    )
    shifted = g.op(
        "QuantizeLinear", g.op("Add", x, three), _constant(g, 6 / 256, torch.float32), _constant(g, 0, torch.uint8)
    )
    return _quantized_tuple(g, shifted, 1 / 256, 0)


def _mean() -> Callable[..., Any]:
    """Symbolic for aten::mean that exports a quantized global spatial mean as GlobalAveragePool.

    ``x.mean([2, 3])`` of a quantized NCHW tensor becomes DQ -> GlobalAveragePool -> Q (input's scale,
    as PyTorch's quantized mean), then a reshape of the integers: onnxruntime fuses the first three into
    QLinearGlobalAveragePool; it has no integer ReduceMean. Everything else exports as before.
    """
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as ts

    stock = ts._reduce_with_dtype_helper("ReduceMean", "mean")

    def is_global_spatial(x: Any, dims: Any, dtype: Any) -> bool:
        if not _is_quantized_value(x) or sh._get_tensor_rank(ts._unpack_quantized_tensor(x)[0]) != 4:
            return False
        dims = sh._maybe_get_const(dims, "is")
        return isinstance(dims, list) and sorted(d % 4 for d in dims) == [2, 3] and sh._is_none(dtype)

    def symbolic(g: Any, x: Any, *args: Any) -> Any:
        if len(args) != 3 or not is_global_spatial(x, args[0], args[2]):
            return stock(g, x, *args)
        keepdim = sh._maybe_get_const(args[1], "i")
        values, scale, zero_point, _ = sh.dequantize_helper(g, x)
        pooled = g.op("QuantizeLinear", g.op("GlobalAveragePool", values), scale, zero_point)
        if not keepdim:
            pooled = g.op("Flatten", pooled, axis_i=1)
        return g.op("prim::TupleConstruct", pooled, scale, zero_point)

    return symbolic


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
    """Symbolic for quantized::batch_norm2d(_relu): a depthwise 1x1 QDQ convolution [-> Relu] -> Q.

    With ``k = weight / sqrt(var + eps)``, BatchNorm is ``x * k + (bias - mean * k)`` per channel, which
    ``_depthwise_affine`` writes as the QDQ form of an int8 convolution: onnxruntime fuses it into
    QLinearConv, where a float multiply-add would run between DQ and Q. Below opset 13 (no per-channel
    DequantizeLinear) the multiply-add stays in float. The plain form, DequantizeLinear ->
    BatchNormalization, crashes OpenVINO 2026.4 (segfault in compile_model) after a quantized Concat, as
    in densely connected blocks: Concat -> QuantizeLinear (zero point not 0) -> DequantizeLinear -> ...
    """
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "v", "v", "v", "v", "f", "v", "v")
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float, scale: Any, zp: Any) -> Any:
        k = g.op("Div", weight, g.op("Sqrt", g.op("Add", var, _constant(g, eps, torch.float32))))
        shift = g.op("Sub", bias, g.op("Mul", mean, k))
        x, in_scale, _, _ = sh.dequantize_helper(g, x)
        channels = sh._get_tensor_dim_size(x, 1)
        if g.opset >= 13 and channels is not None:
            out = _depthwise_affine(g, x, in_scale, k, shift, channels)
        else:
            per_channel = _constant(g, [1, -1, 1, 1], torch.int64)
            out = g.op("Add", g.op("Mul", x, g.op("Reshape", k, per_channel)), g.op("Reshape", shift, per_channel))
        return sh.quantize_helper(g, g.op("Relu", out) if relu else out, scale, zp)

    return symbolic


def _depthwise_affine(g: Any, x: Any, in_scale: Any, gain: Any, shift: Any, channels: int) -> Any:
    """``x * gain + shift`` per channel as Conv(x, DQ(int8 weight), DQ(int32 bias)): an int8 depthwise 1x1 conv.

    The weight scale is ``|gain| / 127``, so the int8 weight ``±127`` is exact and the int32 bias is
    rounded to 1/127 of an input step times ``|gain|``. The scale is raised where the bias would need
    more than 30 bits (a channel whose gain is next to nothing against its shift), and kept positive.
    """
    int8, int32 = 3, 6  # onnx.TensorProto.INT8, INT32
    bias_limit = g.op("Div", g.op("Abs", shift), g.op("Mul", in_scale, _constant(g, 2.0**30, torch.float32)))
    weight_scale = g.op(
        "Max",
        g.op("Div", g.op("Abs", gain), _constant(g, 127.0, torch.float32)),
        bias_limit,
        _constant(g, 1e-30, torch.float32),
    )
    weight_int = g.op("Cast", g.op("Round", g.op("Div", gain, weight_scale)), to_i=int8)
    weight_int = g.op("Reshape", weight_int, _constant(g, [-1, 1, 1, 1], torch.int64))
    weight = g.op("DequantizeLinear", weight_int, weight_scale, _zeros_like(g, weight_scale, torch.int8), axis_i=0)
    bias_scale = g.op("Mul", weight_scale, in_scale)
    bias_int = g.op("Cast", g.op("Round", g.op("Div", shift, bias_scale)), to_i=int32)
    bias = g.op("DequantizeLinear", bias_int, bias_scale, _zeros_like(g, bias_scale, torch.int32), axis_i=0)
    return g.op("Conv", x, weight, bias, group_i=channels, kernel_shape_i=[1, 1])


def _quantized_relu6(g: Any, x: Any, inplace: bool) -> Any:
    """Symbolic for quantized::relu6 (``QuantOptions.relu6='exact'`` on x86): one uint8 Clip of the codes.

    PyTorch's quantized ReLU6 keeps its input's scale and zero point, so it clamps the codes to
    [zero point, zero point + round(6 / scale)]: no dequantize, no float.
    """
    from torch.onnx import symbolic_helper as sh

    values, _, _, _ = sh.dequantize_helper(g, x)
    codes, scale, zero_point = list(values.node().inputs())[:3]
    top = g.op(
        "Add", g.op("Round", g.op("Div", _constant(g, 6.0, torch.float32), scale)), g.op("Cast", zero_point, to_i=1)
    )
    top = g.op("Cast", g.op("Min", top, _constant(g, 255.0, torch.float32)), to_i=2)
    return g.op("prim::TupleConstruct", g.op("Clip", codes, zero_point, top), scale, zero_point)


def _zeros_like(g: Any, value: Any, dtype: torch.dtype) -> Any:
    return g.op("ConstantOfShape", g.op("Shape", value), value_t=torch.tensor([0], dtype=dtype))


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
