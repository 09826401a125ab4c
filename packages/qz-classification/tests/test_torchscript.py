"""TorchScript and FX: one model per family, following torchvision's quantized-classification test.

The float model (qz's builder, ``quantize=False``) traces with ``torch.fx`` to the same output. Its
INT8 conversion (qconfig, ``fuse_model``, prepare or prepare_qat, one calibration input, convert)
scripts, the scripted model computes exactly the eager INT8 output, and so does its save/load copy.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.ao.quantization as tq
from torch import Tensor, nn
from torchvision.models import GoogLeNetOutputs, InceptionOutputs

import qz_core
from qz_core import make_qconfig

ENGINE = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
INPUT_SIZES = {"inception_v3": 80}
PTQ_MODELS = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "googlenet",
    "inception_v3",
    "densenet121",
    "efficientnet_b0",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "convnext_tiny",
]
QAT_MODELS = ["mobilenet_v3_small", "efficientnet_b0"]


@pytest.fixture
def quantized_engine():
    """Runs the test on ``ENGINE`` and restores the previous quantized engine afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    yield ENGINE
    torch.backends.quantized.engine = previous


def _input(name: str) -> Tensor:
    size = INPUT_SIZES.get(name, 64)
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _logits(output: Tensor | GoogLeNetOutputs | InceptionOutputs) -> Tensor:
    """The logits: scripted GoogLeNet and Inception v3 return torchvision's named tuple in every mode."""
    return output if isinstance(output, Tensor) else output.logits


def _float_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return qz_core.get_model(name, num_classes=10)


def _int8_model(name: str, is_qat: bool, x: Tensor) -> nn.Module:
    """torchvision's flow: qconfig, fuse, prepare (eval) or prepare_qat (train), one input, convert."""
    model = _float_model(name)
    model.train(is_qat)
    model.qconfig = make_qconfig(ENGINE, is_qat=is_qat, activation="minmax")
    model.fuse_model(is_qat=is_qat)
    prepare = tq.prepare_qat if is_qat else tq.prepare
    prepare(model, inplace=True)
    model(torch.cat([x, x.flip(0, 2, 3)]) if is_qat else x)  # QAT trains BatchNorm: two samples
    model.eval()
    return tq.convert(model, inplace=True)


def _assert_scripts_to_same_output(model: nn.Module, x: Tensor) -> None:
    # The first calls of an optimizing executor profile and recompile: slow, and not what is tested.
    with torch.no_grad(), torch.jit.optimized_execution(False):
        expected = model(x)
        scripted = torch.jit.script(model)
        assert torch.equal(_logits(scripted(x)), expected)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        assert torch.equal(_logits(loaded(x)), expected)
    assert expected.is_floating_point() and expected.shape == (1, 10)


@pytest.mark.parametrize(
    ("name", "is_qat"), [*((name, False) for name in PTQ_MODELS), *((name, True) for name in QAT_MODELS)]
)
def test_int8_model_scripts(name, is_qat, quantized_engine):
    x = _input(name)
    model = _int8_model(name, is_qat=is_qat, x=x)
    assert qz_core.workflow.is_quantized(model)
    _assert_scripts_to_same_output(model, x)


@pytest.mark.parametrize("name", PTQ_MODELS)
def test_float_model_fx_traces(name):
    model = _float_model(name).eval()
    x = _input(name)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_scripted_float_silu_stays_exact():
    """A scripted unconverted EfficientNet keeps ``F.silu``, so it equals the eager float model."""
    model = _float_model("efficientnet_b0").eval()
    x = _input("efficientnet_b0")
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), model(x))
