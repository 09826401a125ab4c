"""Shared checks for the segmentation families: every family test runs the same contract."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

from qz_core.tools.support import SupportResult, float_difference, probe_model
from qz_core.tools.testing import assert_support_contract

os.environ.setdefault("YOLO_OFFLINE", "1")

ALL_MODELS = [
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]
WITH_AUX = [n for n in ALL_MODELS if not n.startswith("lraspp")]


def assert_matches_torchvision(name: str, tmp_path, input_size: int = 64, **kwargs) -> None:
    """Unconverted, qz's ``name`` computes exactly torchvision's float model on the same weights."""
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, weights_backbone=None, **kwargs).eval()
    x = torch.randn(2, 3, input_size, input_size)
    assert float_difference(name, reference, x, tmp_path, **kwargs) == 0.0


def assert_fully_supported(
    name: str, tmp_path, input_size: int = 96, slack: float = 1.5, **build_kwargs
) -> SupportResult:
    """PTQ and QAT reach INT8 on x86 and qnnpack; INT8 ONNX runs in onnxruntime and agrees.

    Agreement: onnxruntime's INT8 output is about as close to FP32 as PyTorch's INT8 output is
    (within ``slack`` times PyTorch's own INT8 error, plus 2% of the output range). Batches of 2:
    the image-pooling branches see 1x1 maps, and BatchNorm trains (QAT) only on more than one value.
    """
    # Uniform, like the probe's BatchNorm-settling and calibration batches: the statistics fit this input.
    x = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    build_kwargs.setdefault("activation_observer", "minmax")
    result = probe_model(name, example_input=x, work_dir=tmp_path, build_kwargs=build_kwargs)
    return assert_support_contract(result, slack=slack)


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
