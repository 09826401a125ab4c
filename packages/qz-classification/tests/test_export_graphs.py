"""What onnxruntime and OpenVINO run from qz's INT8 ONNX export: no float islands where they have integer kernels.

onnxruntime's optimized graph (``ORT_ENABLE_ALL``) shows which QDQ patterns it fused into integer
kernels (QLinearAdd, QLinearMul, QLinearGlobalAveragePool, ...); any other compute node that reads a
DequantizeLinear or feeds a QuantizeLinear runs in float. OpenVINO's runtime model gives each executed
layer's precision. Random weights, 64x64 inputs: the graphs are the same as at full size.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.ao.quantization as tq
from torch import Tensor, nn

from qz_classification.models import efficientnet, mobilenetv3, shufflenetv2
from qz_core import calibrate, convert, estimate_bn_stats, export_onnx, run_onnx
from qz_core.openvino_runtime import ov_checked_compile, ov_run, precision_counts

SIZE = 64
QDQ = ("QuantizeLinear", "DequantizeLinear")
# Nodes that move or reshape integers: they do no arithmetic, so they are no float island.
LAYOUT_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split", "Gather", "Slice")
# OpenVINO layer types that work on activations besides convolutions and matmuls (``runs_int8`` covers those).
OV_ELEMENTWISE = ("Eltwise", "Math", "Subgraph", "Reduce", "Pooling", "Concatenation", "MVN", "RMS")


def ort_float_islands(path: Path) -> collections.Counter[str]:
    """Op type -> count of onnxruntime's optimized-graph nodes that compute in float next to a DQ or Q."""
    optimized = path.with_suffix(".ort.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized)).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    islands: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in QDQ + LAYOUT_OPS:
            continue
        reads_dq = any(producers.get(name) == "DequantizeLinear" for name in node.input)
        feeds_q = any("QuantizeLinear" in consumers[name] for name in node.output)
        if reads_dq or feeds_q:
            islands[node.op_type] += 1
    return islands


def ort_fused(path: Path) -> collections.Counter[str]:
    """Op type -> count of onnxruntime's integer (com.microsoft QLinear*) kernels in the optimized graph."""
    graph = onnx.load(str(path.with_suffix(".ort.onnx"))).graph
    return collections.Counter(n.op_type for n in graph.node if n.op_type.startswith("QLinear"))


def ov_float_layers(compiled: object) -> dict[str, int]:
    """Layer type -> number of activation layers OpenVINO runs in f32 (the input's QuantizeLinear is one)."""
    counts = precision_counts(compiled)
    return {layer: counts[layer]["f32"] for layer in OV_ELEMENTWISE if counts.get(layer, {}).get("f32")}


def float_and_int8(builder: object, tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """``builder``'s float model (BatchNorm statistics from random inputs) and its calibrated (min/max) INT8 model."""
    torch.manual_seed(0)
    float_model = builder()
    estimate_bn_stats(float_model, [torch.rand(2, 3, SIZE, SIZE) for _ in range(2)])
    weights = tmp_path / "float.pth"
    torch.save(float_model.state_dict(), weights)
    model = builder(weights=str(weights), quantize=True, backend="x86", activation_observer="minmax")
    calibrate(model, [torch.rand(1, 3, SIZE, SIZE) for _ in range(2)], progress=False)
    return float_model.eval(), convert(model)


def export_and_check(builder: object, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Exports ``builder``'s INT8 model; onnxruntime and OpenVINO (compiled in a guarded child first) agree with it.

    Agreement as the support contract's: each runtime's INT8 output is about as close to FP32 as
    PyTorch's INT8 output is (1.5 times its error, plus 2% of the output range); random weights
    amplify single rounding steps too much for a fixed bound.
    """
    float_model, int8 = float_and_int8(builder, tmp_path)
    x = torch.rand(1, 3, SIZE, SIZE)
    report = export_onnx(int8, tmp_path / "int8.onnx", x)
    compiled = ov_checked_compile(report.path)
    with torch.no_grad():
        reference, torch_int8 = float_model(x).numpy(), int8(x).numpy()
    bound = 1.5 * np.abs(torch_int8 - reference).max() + 0.02 * np.ptp(reference)
    for got in (run_onnx(report.path, x)[0], ov_run(compiled, x)[0]):
        assert np.abs(got - reference).max() <= bound
    return report.path, ov_float_layers(compiled)


class _Single(nn.Module):
    """QuantStub -> one op -> DeQuantStub: what the exporter makes of that op alone."""

    def __init__(self, op: object) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.dequant = tq.DeQuantStub()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.op(self.quant(x)))


def _quantized_single(op: object) -> nn.Module:
    model = _Single(op).eval()
    model.qconfig = tq.get_default_qconfig("x86")
    prepared = tq.prepare(model)
    prepared(torch.randn(4, 8, 9, 9) * 4)
    return tq.convert(prepared)


@pytest.mark.parametrize("opset", [13, 18])
def test_quantized_hardsigmoid_is_one_integer_add_and_exact(tmp_path, opset):
    int8 = _quantized_single(nn.functional.hardsigmoid)
    x = torch.linspace(-5, 5, 2 * 8 * 9 * 9).reshape(2, 8, 9, 9)
    report = export_onnx(int8, tmp_path / "hardsigmoid.onnx", x, opset=opset)
    assert report.max_abs_diff == 0.0
    assert not ort_float_islands(report.path)
    assert ort_fused(report.path) == {"QLinearAdd": 1}


@pytest.mark.parametrize("opset", [13, 18])
def test_quantized_spatial_mean_is_an_integer_global_pool_and_exact(tmp_path, opset):
    int8 = _quantized_single(lambda x: x.mean([2, 3]))
    x = torch.randn(2, 8, 9, 9) * 4
    report = export_onnx(int8, tmp_path / "mean.onnx", x, opset=opset)
    assert report.max_abs_diff == 0.0
    assert not ort_float_islands(report.path)
    assert ort_fused(report.path) == {"QLinearGlobalAveragePool": 1}


def test_float_hardsigmoid_and_mean_export_as_before(tmp_path):
    model = nn.Sequential(nn.Hardsigmoid(), nn.Flatten(2)).eval()
    export_onnx(model, tmp_path / "float.onnx", torch.randn(1, 4, 3, 3))
    types = {n.op_type for n in onnx.load(str(tmp_path / "float.onnx")).graph.node}
    assert "HardSigmoid" in types
    other_dim = _quantized_single(lambda x: x.mean(1))
    report = export_onnx(other_dim, tmp_path / "mean1.onnx", torch.randn(2, 8, 9, 9))
    assert "ReduceMean" in {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert report.max_abs_diff <= float(other_dim.quant.scale) + 1e-6


class _BatchNormReLU(nn.Module):
    """QuantStub -> BatchNorm2d [-> ReLU] -> DeQuantStub, as DenseNet's BN-ReLU pairs with no conv before them."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.dequant = tq.DeQuantStub()
        self.norm = nn.BatchNorm2d(6)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.relu(self.norm(self.quant(x))))


@pytest.mark.parametrize("relu", [True, False])
def test_quantized_batch_norm_is_an_integer_depthwise_conv(tmp_path, relu):
    """DenseNet's BNReLU2d ran as a float Cast/Mul/Add between DQ and Q in onnxruntime (62 in densenet121)."""
    torch.manual_seed(0)
    model = _BatchNormReLU(relu).eval()
    with torch.no_grad():  # negative, zero and vanishing gains next to large shifts
        model.norm.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 1e-9, 0.2, -2.0]))
        model.norm.bias.copy_(torch.tensor([0.3, -0.2, 0.5, -0.4, 3.0, 0.0]))
        model.norm.running_mean.copy_(torch.randn(6))
        model.norm.running_var.copy_(torch.rand(6) + 0.5)
    if relu:
        tq.fuse_modules(model, [["norm", "relu"]], inplace=True)
    model.qconfig = tq.get_default_qconfig("x86")
    prepared = tq.prepare(model)
    x = torch.randn(2, 6, 7, 7) * 3
    prepared(x)
    int8 = tq.convert(prepared)
    report = export_onnx(int8, tmp_path / "bn.onnx", x)
    assert report.max_abs_diff <= float(int8.norm.scale) + 1e-6  # at most one output step, at rounding ties
    assert not ort_float_islands(report.path)
    assert ort_fused(report.path) == {"QLinearConv": 1}
    ov_checked_compile(report.path)


def test_mobilenet_v3_small_hardsigmoid_se_runs_in_integers(tmp_path):
    """Its 9 SE hardsigmoids ran as float HardSigmoid between DQ and Q in onnxruntime and as f32 Math in OpenVINO."""
    path, ov_float = export_and_check(mobilenetv3.mobilenet_v3_small, tmp_path)
    assert not ort_float_islands(path)
    assert ort_fused(path)["QLinearAdd"] == 9 + 19 + 6  # SE hardsigmoids, hardswishes, residual adds
    assert ov_float == {"Subgraph": 1}  # the input's QuantizeLinear


def test_shufflenet_v2_global_pool_runs_in_integers(tmp_path):
    """Its final ``x.mean([2, 3])`` ran as a float ReduceMean between DQ and Q in onnxruntime."""
    path, ov_float = export_and_check(shufflenetv2.shufflenet_v2_x0_5, tmp_path)
    assert not ort_float_islands(path)
    assert ort_fused(path)["QLinearGlobalAveragePool"] == 1
    assert ov_float == {"Subgraph": 1}


def test_efficientnet_b0_silu_and_se_run_in_integers(tmp_path):
    """SiLU (sigmoid, multiply) and the SE (pool, sigmoid, multiply) fuse into integer kernels in both runtimes."""
    path, ov_float = export_and_check(efficientnet.efficientnet_b0, tmp_path)
    assert not ort_float_islands(path)
    fused = ort_fused(path)
    assert fused["QLinearSigmoid"] == fused["QLinearMul"] == 49 + 16  # SiLUs + SE scales
    assert fused["QLinearGlobalAveragePool"] == 16 + 1
    assert ov_float == {"Subgraph": 1}
