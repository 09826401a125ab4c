"""``QuantOptions.relu6``: a conv-bn-ReLU6 fused as conv-ReLU still computes ReLU6 in INT8 ('clamp', 'exact')."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qz_core import QuantOptions, QzError, calibrate, convert, fuse_sequentials
from qz_core.builder import prepare_quantizable
from qz_core.fusion import relu6_to_relu
from qz_core.qconfig import ClampedActivation

BACKENDS = ["x86", "qnnpack"]


class Relu6Net(nn.Module):
    """Two conv-bn-ReLU6 Sequentials whose pre-activations reach far past 6."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.first = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.second = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU6())
        with torch.no_grad():
            for block in (self.first, self.second):
                block[0].weight.mul_(6.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.second(self.first(self.quant(x))))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        relu6_to_relu(self)
        fuse_sequentials(self, is_qat)


def _prepared(model: nn.Module, mode: str, backend: str, is_qat: bool = False) -> nn.Module:
    options = QuantOptions(backend=backend, relu6=mode)
    return prepare_quantizable(
        copy.deepcopy(model), quantize=True, is_qat=is_qat, skip_fuse=False, options=options, backend=backend
    )


@pytest.fixture(scope="module")
def float_model_and_inputs() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Relu6Net().eval(), torch.randn(4, 3, 16, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_computes_relu6_where_relu_does_not(float_model_and_inputs, backend):
    model, x = float_model_and_inputs
    with torch.no_grad():
        reference = model(x)
        assert reference.max() == 6.0  # the ReLU6 bites
        errors = {}
        for mode in ("clamp", "exact", "relu"):
            prepared = _prepared(model, mode, backend)
            observed = prepared(x)
            calibrate(prepared, [x], progress=False)
            quantized = convert(prepared)(x)
            errors[mode] = (observed - reference).abs().max().item(), (quantized - reference).abs().max().item()
    assert errors["clamp"][0] < 1e-4 and errors["exact"][0] < 1e-4  # calibration sees the float model's function
    assert errors["relu"][0] > 1.0  # without the clamp the fused ReLU lets values past 6 through
    assert errors["exact"][1] < 1.0  # a few quantization steps of the 6 / 127 or 6 / 255 grid
    assert errors["relu"][1] > 10.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["clamp", "exact"])
def test_clamped_int8_output_range(float_model_and_inputs, backend, mode):
    model, x = float_model_and_inputs
    prepared = _prepared(model, mode, backend)
    assert isinstance(prepared.first[0].activation_post_process, ClampedActivation)
    with torch.no_grad():
        calibrate(prepared, [x], progress=False)
        int8 = convert(prepared)
        first = int8.first(int8.quant(x)).dequantize()
    levels = 127 if backend == "x86" else 255  # x86 quantizes activations to 7 bits
    scale = int8.first[0].scale
    assert scale * levels <= 6.0 + 1e-6  # no quantization levels spent past 6
    # x86's 7-bit activations saturate only at twice their range; 'exact' puts a quantized ReLU6 there.
    exact_here = mode == "exact" or backend == "qnnpack"
    assert isinstance(int8.first[2], nnq.ReLU6) == (mode == "exact" and backend == "x86")
    assert (first.max() <= 6.0 + 1e-6) == exact_here
    assert first.max() <= 255 * scale + 1e-6


def test_clamp_in_qat_fake_quantizes_within_six(float_model_and_inputs):
    model, x = float_model_and_inputs
    prepared = _prepared(model, "clamp", "qnnpack", is_qat=True)
    prepared.train()
    out = prepared.first(prepared.quant(x))
    assert out.max() <= 6.0 + 1e-6
    out.sum().backward()
    assert prepared.first[0].weight.grad is not None
    state = prepared.state_dict()
    again = _prepared(model, "clamp", "qnnpack", is_qat=True)
    again.load_state_dict(state)  # the clamp's observer state round-trips (QAT checkpoints, --resume)


def test_unquantized_model_keeps_relu6(float_model_and_inputs):
    model, x = float_model_and_inputs
    built = prepare_quantizable(
        copy.deepcopy(model), quantize=False, is_qat=False, skip_fuse=False, options=QuantOptions(), backend="x86"
    )
    assert torch.equal(built(x), model(x))


def test_bad_relu6_mode_names_the_choices():
    with pytest.raises(QzError, match=r"relu6.*'clip'.*clamp, exact, relu"):
        QuantOptions(relu6="clip")


def test_exact_relu6_exports_as_a_uint8_clip(float_model_and_inputs, tmp_path):
    import onnx

    from qz_core import export_onnx, run_onnx

    model, x = float_model_and_inputs
    prepared = _prepared(model, "exact", "x86")
    with torch.no_grad():
        calibrate(prepared, [x], progress=False)
        int8 = convert(prepared)
        expected = int8(x[:1])
    export_onnx(int8, tmp_path / "m.onnx", x[:1])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Clip") == 2 and "Relu6" not in ops
    onnx_out = torch.from_numpy(run_onnx(tmp_path / "m.onnx", x[:1])[0])
    assert onnx_out.max() <= 6.0 + 1e-6
    step = int8.second[0].scale
    assert (onnx_out - expected).abs().max() <= step + 1e-6  # onnxruntime's rounding: at most one step apart
