"""Quantizable GoogLeNet and Inception v3: torchvision parity, full INT8 support, aux/transform_input rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import GoogLeNet_Weights, Inception_V3_Weights

from qz_classification.models.googlenet import drop_aux_after_load, torchvision_weights_rules
from qz_core import (
    BuildContext,
    calibrate,
    convert,
    count_float_islands,
    get_model,
    get_model_spec,
    load_quantized,
    recipe_of,
    save_quantized,
)
from qz_core.tools.support import probe_model
from qz_core.weights import WeightsSource

from conftest import assert_fully_supported, assert_matches_torchvision


def unfused(model: nn.Module) -> list[str]:
    """BatchNorm and ReLU modules left outside torch's fused (intrinsic) modules."""
    inside = set()
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.intrinsic"):
            inside |= {f"{name}.{child}" for child, _ in module.named_modules() if child}
    return [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, nn.ReLU) and n not in inside]


# Inception v3 runs from 75x75 in eval; its auxiliary head, which runs in training mode (BatchNorm
# re-estimation, QAT), needs the full 299x299.
SIZES = {"googlenet": 64, "inception_v3": 160}
TRAIN_SIZES = {"googlenet": 64, "inception_v3": 299}


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path, input_size=SIZES[name])


def test_googlenet_fully_supported(tmp_path):
    assert assert_fully_supported("googlenet", tmp_path, input_size=TRAIN_SIZES["googlenet"]).float_islands == 0


@pytest.mark.parametrize("is_qat", [False, True])
@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_every_conv_bn_relu_fuses(name, is_qat):
    model = get_model(name, quantize=True, is_qat=is_qat, num_classes=10)
    assert unfused(model) == []
    assert count_float_islands(model) == 0


def test_inception_v3_input_size():
    assert get_model_spec("inception_v3").input_size == (299, 299)


def _context(weights=None, path=None):
    return BuildContext(WeightsSource(weights, path) if weights or path else None, False, False, False)


@pytest.mark.parametrize(("weights_enum", "aux_default"), [(GoogLeNet_Weights, False), (Inception_V3_Weights, True)])
def test_torchvision_weights_rules_follow_torchvision(weights_enum, aux_default, tmp_path):
    adjust = torchvision_weights_rules(aux_default)
    kwargs: dict = {}
    adjust(_context(weights_enum.DEFAULT), kwargs)
    expected = {"transform_input": True, "aux_logits": aux_default, "init_weights": False, "load_aux_heads": True}
    assert kwargs == expected
    kwargs = {"transform_input": False, "aux_logits": True}
    adjust(_context(weights_enum.DEFAULT), kwargs)
    assert kwargs["transform_input"] is False and kwargs["aux_logits"] is True
    # Without torchvision weights (none, or a checkpoint file) nothing changes.
    for context in (_context(), _context(path=tmp_path / "float.pth")):
        kwargs = {}
        adjust(context, kwargs)
        assert kwargs == {}


@pytest.mark.filterwarnings("ignore:.*observers saw no data")  # a kept aux head runs in training mode only
@pytest.mark.parametrize(
    ("name", "weights_enum", "heads", "kept"),
    [
        ("googlenet", GoogLeNet_Weights, ("aux1", "aux2"), False),
        ("inception_v3", Inception_V3_Weights, ("AuxLogits",), True),
    ],
)
def test_torchvision_weights_load_with_aux_heads_and_the_recipe_rebuilds(
    name, weights_enum, heads, kept, monkeypatch, tmp_path
):
    """torchvision's checkpoints hold the aux heads: they load, then go unless kept; the recipe says which."""
    torch.manual_seed(0)
    state = get_model(name, aux_logits=True, init_weights=False).state_dict()
    monkeypatch.setattr(type(weights_enum.DEFAULT), "get_state_dict", lambda self, *args, **kwargs: state)
    model = get_model(name, weights="DEFAULT", quantize=True, activation_observer="minmax")
    assert model.aux_logits is kept and all((getattr(model, h) is not None) is kept for h in heads)
    recipe = recipe_of(model)
    assert recipe.model_kwargs["aux_logits"] is kept and "load_aux_heads" not in recipe.model_kwargs
    assert recipe.model_kwargs["transform_input"] is True
    size = SIZES[name]
    calibrate(model, [torch.randn(1, 3, size, size)], progress=False)
    int8 = convert(model)
    save_quantized(int8, tmp_path / "int8.pt")
    loaded = load_quantized(tmp_path / "int8.pt")
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))


@pytest.mark.parametrize(("name", "heads"), [("googlenet", ("aux1", "aux2")), ("inception_v3", ("AuxLogits",))])
def test_aux_heads_drop_after_loading(name, heads, tmp_path):
    model = get_model(name, num_classes=10)
    path = tmp_path / "with_aux.pth"
    torch.save(model.state_dict(), path)
    drop_aux_after_load(model, heads)
    assert all(getattr(model, h) is not None for h in heads)
    model.load_state_dict(torch.load(path))
    assert model.aux_logits is False and all(getattr(model, h) is None for h in heads)
    model.eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(1, 3, 96, 96)), torch.Tensor)


def test_training_output_has_aux_logits_and_eval_output_is_logits():
    model = get_model("googlenet", num_classes=10, quantize=True, is_qat=True)
    out = model(torch.randn(2, 3, 64, 64))
    assert len(out) == 3 and out.logits.shape == (2, 10)
    model.eval()
    assert isinstance(model(torch.randn(2, 3, 64, 64)), torch.Tensor)


@pytest.mark.zoo
def test_zoo_googlenet(tmp_path):
    assert_matches_torchvision("googlenet", tmp_path, input_size=SIZES["googlenet"])
    assert assert_fully_supported("googlenet", tmp_path, input_size=TRAIN_SIZES["googlenet"]).float_islands == 0


@pytest.mark.zoo
def test_zoo_inception_v3(tmp_path):
    """As ``assert_fully_supported``, at batch 2: the aux head's BatchNorm sees 1x1 maps in training mode,
    which needs more than one sample (``probe_model`` re-estimates BatchNorm on batches of its input's size).
    """
    assert_matches_torchvision("inception_v3", tmp_path, input_size=SIZES["inception_v3"])
    size = TRAIN_SIZES["inception_v3"]
    result = probe_model("inception_v3", example_input=torch.randn(2, 3, size, size), work_dir=tmp_path)
    assert result.errors == {}, result.errors
    assert result.ptq and result.qat and result.engines == {"x86": True, "qnnpack": True}
    assert result.fp32_onnx and result.int8_onnx and result.float_islands == 0
    assert result.onnx_fp32_diff <= 1.5 * result.int8_max_diff + 0.02 * result.output_range, result
