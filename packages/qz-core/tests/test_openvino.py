"""OpenVINO as a deployment runtime: compile and run qz's ONNX files, IR export, bench columns, crash guard."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

import qz_core
from qz_core import QzError, openvino_runtime
from qz_core.cli import main
from qz_core.openvino_runtime import (
    OPENVINO_MISSING,
    check_compiles,
    import_openvino,
    ov_checked_compile,
    ov_run,
    precision_counts,
    run_guarded,
    runs_int8,
)
from qz_core.tools.bench import bench_markdown, read_bench_json, run_benchmark

from conftest import TINY, random_batches

SEGFAULT_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def _int8(path: str) -> nn.Module:
    model = qz_core.get_model(TINY, weights=str(path), quantize=True, backend="x86")
    qz_core.calibrate(model, random_batches(), progress=False)
    return qz_core.convert(model)


def test_fp32_onnx_runs_in_openvino_as_float_and_agrees(checkpoint, tmp_path):
    _, float_model = checkpoint
    x = random_batches(1, batch=1, seed=3)[0]
    report = qz_core.export_onnx(float_model, tmp_path / "tiny.onnx", x)
    compiled = ov_checked_compile(report.path, threads=1)
    got = ov_run(compiled, x)[0]
    with torch.no_grad():
        expected = float_model(x).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert not runs_int8(precision_counts(compiled))


def test_int8_onnx_runs_in_openvino_in_integers_and_agrees(checkpoint, tmp_path):
    int8 = _int8(checkpoint[0])
    x = random_batches(1, batch=1, seed=7)[0]
    report = qz_core.export_onnx(int8, tmp_path / "tiny_int8.onnx", x)
    compiled = ov_checked_compile(report.path, threads=1)
    got = ov_run(compiled, x)[0]
    ort = qz_core.run_onnx(report.path, x)[0]
    assert np.abs(got - ort).max() <= 0.05 * report.output_range
    counts = precision_counts(compiled)
    assert set(counts["Convolution"]) <= {"u8", "i8"}, counts
    assert runs_int8(counts)


class _ConcatBatchNorm(nn.Module):
    """DenseNet's pattern: two convolutions concatenated, then a BatchNorm-ReLU of its own, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.cat = FloatFunctional()
        self.bn, self.relu = nn.BatchNorm2d(12), nn.ReLU()
        self.conv = nn.Conv2d(12, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu(self.bn(self.cat.cat([self.left(x), self.right(x)], 1)))
        return self.dequant(self.conv(x))


def test_quantized_batch_norm_after_concat_compiles_in_openvino(tmp_path):
    torch.manual_seed(0)
    model = _ConcatBatchNorm().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    tq.fuse_modules(model, [["bn", "relu"]], inplace=True)
    model.qconfig = qz_core.make_qconfig("x86")
    qz_core.set_backend("x86")
    tq.prepare(model, inplace=True)
    for batch in random_batches(2, size=16):
        model(batch)
    int8 = tq.convert(model)
    assert int8.cat.zero_point != 0  # the concat's zero point is what crashed OpenVINO with the plain form
    x = random_batches(1, size=16, batch=1, seed=5)[0]
    report = qz_core.export_onnx(int8, tmp_path / "concat_bn.onnx", x)
    assert report.max_abs_diff <= 4 * float(int8.conv.scale) + 1e-6
    check_compiles(report.path)  # a segfault here would be a QzError
    got = ov_run(openvino_runtime.ov_compile(report.path), x)[0]
    assert np.abs(got - qz_core.run_onnx(report.path, x)[0]).max() <= 4 * float(int8.conv.scale) + 1e-6


def test_cli_export_openvino_writes_ir_that_loads(checkpoint, tmp_path, capsys):
    int8_file = tmp_path / "tiny_int8.pt"
    qz_core.save_quantized(_int8(checkpoint[0]), int8_file)
    out_dir = tmp_path / "ir"
    args = ["export", TINY, "--weights", str(checkpoint[0]), "--int8", str(int8_file), "--out", str(out_dir / "t.xml")]
    assert main([*args, "--format", "openvino"]) == 0
    text = capsys.readouterr().out
    assert "FP32 OpenVINO IR" in text and "INT8 OpenVINO IR" in text
    assert sorted(p.name for p in out_dir.iterdir()) == ["t.bin", "t.xml", "t_int8.bin", "t_int8.xml"]
    ov = import_openvino()
    x = random_batches(1, batch=1)[0]
    for name in ("t.xml", "t_int8.xml"):
        compiled = ov.Core().compile_model(ov.Core().read_model(out_dir / name), "CPU")
        assert ov_run(compiled, x)[0].shape == (1, 4)


def test_cli_export_openvino_wants_an_xml_path(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qz_core.job, "get_model_builder", lambda name: pytest.fail("built a model"))
    args = ["export", TINY, "--weights", str(checkpoint[0]), "--out", str(tmp_path / "t.onnx")]
    assert main([*args, "--format", "openvino"]) == 2
    assert "should end in .xml" in capsys.readouterr().err


def test_missing_openvino_is_one_line_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(QzError) as info:
        import_openvino()
    assert str(info.value) == OPENVINO_MISSING and "pip install 'qz-core[openvino]'" in OPENVINO_MISSING
    monkeypatch.setattr(qz_core.job, "get_model_builder", lambda name: pytest.fail("built a model"))
    export = ["export", TINY, "--weights", str(checkpoint[0]), "--out", str(tmp_path / "t.xml"), "--format", "openvino"]
    bench = ["bench", TINY, "--openvino", "--out", str(tmp_path / "bench")]
    for args in (export, bench):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'qz-core[openvino]'" in err, err
    assert not (tmp_path / "bench").exists()


def test_a_crashing_child_is_an_error_not_a_crash():
    with pytest.raises(QzError, match=r"OpenVINO crashed compiling x\.onnx \(signal 11, SIGSEGV\)"):
        run_guarded([sys.executable, "-c", SEGFAULT_CHILD], "compiling x.onnx")
    with pytest.raises(QzError, match="OpenVINO failed compiling y: ValueError: bad graph"):
        run_guarded([sys.executable, "-c", "raise ValueError('bad graph')"], "compiling y")


def test_a_corrupt_file_fails_to_compile_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(QzError, match="OpenVINO failed compiling .*bad.onnx"):
        check_compiles(bad)


def test_bench_times_openvino_with_the_rest(tmp_path, capsys):
    args = ["bench", TINY, "--openvino", "--rounds", "2", "--warmup", "0", "--calib-batches", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (row,), meta = read_bench_json(tmp_path / "bench.json")
    assert row.error is None and not row.notes, row.notes
    assert {"fp32", "int8", "ort_fp32", "ort_int8", "ov_fp32", "ov_int8"} <= set(row.latency)
    assert "u8" in row.ov_int8_precision or "i8" in row.ov_int8_precision
    fastest = min(row.ms(k) for k in ("int8", "ort_int8", "ov_int8"))
    assert row.deployed_ratio == pytest.approx(fastest / row.ms("fp32"))
    table = (tmp_path / "bench.md").read_text()
    assert "OpenVINO FP32 (ms)" in table and "OpenVINO INT8 (ms)" in table
    assert f"OpenVINO {import_openvino().get_version()}" in table and meta["openvino"]


def test_bench_notes_an_openvino_crash_and_goes_on(monkeypatch):
    monkeypatch.setattr(openvino_runtime, "_COMPILE_CHILD", SEGFAULT_CHILD)
    (row,) = run_benchmark([TINY], rounds=1, warmup=0, calib_batches=1, openvino=True, progress=False)
    assert row.error is None
    assert "OpenVINO crashed compiling" in row.notes["ov_int8"] and "signal 11" in row.notes["ov_int8"]
    assert not {"ov_fp32", "ov_int8"} & set(row.latency)
    assert {"fp32", "int8", "ort_int8"} <= set(row.latency)
    assert "OpenVINO crashed" in bench_markdown([row])
