"""Shared checks for the classification families: every family test runs the same contract."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

from qz_core.tools.support import SupportResult, float_difference, probe_model
from qz_core.tools.testing import assert_support_contract

os.environ.setdefault("YOLO_OFFLINE", "1")


def assert_matches_torchvision(name: str, tmp_path, input_size: int = 64, **kwargs) -> None:
    """Unconverted, qz's ``name`` computes exactly torchvision's float model on the same weights."""
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, **kwargs).eval()
    x = torch.randn(2, 3, input_size, input_size)
    assert float_difference(name, reference, x, tmp_path, **kwargs) == 0.0


def assert_fully_supported(
    name: str, tmp_path, input_size: int = 64, slack: float = 1.5, **build_kwargs
) -> SupportResult:
    """PTQ and QAT reach INT8 on x86 and qnnpack; INT8 ONNX runs in onnxruntime and agrees.

    Agreement: onnxruntime's INT8 output is about as close to FP32 as PyTorch's INT8 output is
    (within ``slack`` times PyTorch's own INT8 error, plus 2% of the output range).
    """
    # Uniform like the probe's random calibration and BatchNorm batches: the ranges it calibrates fit this input.
    x = torch.rand(1, 3, input_size, input_size)
    # Min/max observers keep the default run fast; the histogram default is covered by the ResNet tests.
    build_kwargs.setdefault("activation_observer", "minmax")
    result = probe_model(name, example_input=x, work_dir=tmp_path, build_kwargs=build_kwargs)
    return assert_support_contract(result, slack=slack, float_islands=None)


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
