"""The support probe and the benchmark go through the Task contract only: a task whose export module is
part of the model, that settles random weights its own way and trains on its own loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from qz_core import ModelSpec, QzError, define_model, get_model_spec, register_task
from qz_core.registry import get_task
from qz_core.tools.bench import run_benchmark
from qz_core.tools.support import float_difference, probe_model
from qz_core.tools.testing import assert_support_contract

from conftest import QuantizableTinyNet, ToyClassificationTask

DENSE = "qz_test_dense_tinynet"


class Features(nn.Module):
    """The dense part of a TinyNet: everything before pooling (as a detector's head outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        m = self.model
        return {"features": m.dequant(m.block(m.stem(m.quant(x))))}


class DenseTask(ToyClassificationTask):
    """Exports the features only, and counts what the probe asks of it."""

    name = "qz_test_dense_task"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1

    def export_module(self, model: nn.Module) -> nn.Module:
        self._count("export_module")
        return Features(model)

    def settle_random_weights(self, model: nn.Module, inputs: Any) -> None:
        self._count("settle")
        assert all(len(batch) >= 2 for batch in inputs)  # BatchNorm statistics need two values a channel
        super().settle_random_weights(model, inputs)

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor:
        self._count("training_loss")
        return super().training_loss(model, batch)

    def example_input(self, spec: ModelSpec, batch_size: int = 1) -> Tensor:
        self._count("example_input")
        return super().example_input(spec, batch_size)


try:
    TASK = get_task(DenseTask.name)
except QzError:
    TASK = register_task(DenseTask())
    define_model(
        ModelSpec(
            name=DENSE,
            task=TASK.name,
            family="qz_test_dense",
            make_model=QuantizableTinyNet,
            input_size=(24, 24),
            deployed_ratio_target=0.5,
            probe_kwargs={"activation_observer": "minmax"},
        )
    )


def test_probe_goes_through_the_task(tmp_path) -> None:
    TASK.calls.clear()
    result = probe_model(DENSE, engines=["qnnpack"], work_dir=tmp_path)
    assert_support_contract(result, engines=["qnnpack"])
    assert result.task == TASK.name
    assert {"settle", "training_loss", "export_module", "example_input"} <= set(TASK.calls), TASK.calls
    assert (tmp_path / f"{DENSE}_int8.onnx").is_file()
    import onnx

    graph = onnx.load(str(tmp_path / f"{DENSE}_fp32.onnx")).graph
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 8, 24, 24]  # features, not logits
    model = get_model_spec(DENSE).make_model()
    assert get_model_spec(DENSE).probe_kwargs == {"activation_observer": "minmax"}
    assert float_difference(DENSE, model, torch.rand(1, 3, 24, 24), tmp_path) == 0.0


def test_probe_takes_an_example_input(tmp_path) -> None:
    result = probe_model(DENSE, engines=["qnnpack"], example_input=torch.rand(2, 3, 16, 20), onnx=False)
    assert result.ptq and result.qat and result.errors == {}
    assert not result.fp32_onnx and not result.int8_onnx


def test_probe_records_a_failed_whole_model(tmp_path, monkeypatch) -> None:
    def fails(self: nn.Module, x: Tensor) -> Tensor:
        raise RuntimeError("decoding failed")

    monkeypatch.setattr(QuantizableTinyNet, "forward", fails)
    monkeypatch.setattr(TASK, "settle_random_weights", lambda model, inputs: None)
    result = probe_model(DENSE, engines=["qnnpack"], onnx=False)
    assert "whole[fp32]" in result.errors and "decoding failed" in result.errors["whole[fp32]"]
    assert not result.ptq


def test_bench_keeps_a_partial_ort_out_of_the_deployed_ratio() -> None:
    (row,) = run_benchmark([DENSE], rounds=2, warmup=1, calib_batches=1, progress=False)
    assert row.error is None, row.error
    assert row.ort_partial and {"fp32", "int8", "ort_fp32", "ort_int8"} <= set(row.latency)
    assert row.deployed_ratio == pytest.approx(row.ms("int8") / row.ms("fp32"))
    assert (row.task, row.family, row.target, row.input_size) == (TASK.name, "qz_test_dense", 0.5, (24, 24))
    assert row.as_dict()["ort_partial"] is True


def _dropping_biases(convert_fn):
    """A converter that wrecks the INT8 model the way a broken weight packing would: every bias is lost."""

    def convert(model: nn.Module) -> nn.Module:
        int8 = convert_fn(model)
        for module in int8.modules():
            if hasattr(module, "_weight_bias"):
                weight, _ = module._weight_bias()
                module.set_weight_bias(weight, None)
        return int8

    return convert


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_contract_bounds_int8_against_fp32_on_each_engine(engine, monkeypatch) -> None:
    import qz_core.tools.support.probe as probe

    healthy = probe_model(DENSE, engines=[engine], onnx=False)
    assert healthy.int8_sqnr[engine] > max(20.0, healthy.unrelated_sqnr), healthy
    monkeypatch.setattr(probe, "convert", _dropping_biases(probe.convert))
    wrecked = probe_model(DENSE, engines=[engine], onnx=False)
    assert wrecked.errors == {} and wrecked.engines == {engine: True}  # it runs: only the bound can catch it
    wrecked.fp32_onnx = wrecked.int8_onnx = True
    wrecked.onnx_fp32_diff = 0.0
    with pytest.raises(AssertionError, match="INT8 SQNR"):
        assert_support_contract(wrecked, engines=[engine])
