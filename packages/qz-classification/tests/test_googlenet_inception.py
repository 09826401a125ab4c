"""Quantizable GoogLeNet and Inception v3: torchvision parity, full INT8 support, aux/transform_input rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import GoogLeNet_Weights, Inception_V3_Weights

from qz_classification.models.googlenet import drop_aux_after_load, pretrained_kwargs
from qz_core import count_float_islands, get_model, get_model_entry
from qz_core.support import probe_model

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
    assert get_model_entry("inception_v3").input_size == (299, 299)


@pytest.mark.parametrize(("weights_enum", "aux_default"), [(GoogLeNet_Weights, False), (Inception_V3_Weights, True)])
def test_pretrained_kwargs_follow_torchvision(weights_enum, aux_default):
    kwargs: dict = {}
    assert pretrained_kwargs(weights_enum.DEFAULT, weights_enum, kwargs, aux_default) is aux_default
    assert kwargs == {"transform_input": True, "aux_logits": True, "init_weights": False}
    kwargs = {"transform_input": False, "aux_logits": True}
    assert pretrained_kwargs("DEFAULT", weights_enum, kwargs, aux_default) is True
    assert kwargs["transform_input"] is False
    # Without torchvision weights nothing changes.
    kwargs = {}
    assert pretrained_kwargs(None, weights_enum, kwargs, aux_default) is True
    assert kwargs == {}


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
