"""FCN, DeepLabV3 and LRASPP: torchvision float equality, the INT8 contract, fusion, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn import intrinsic as nni
from torch.ao.nn import quantized as nnq

import qz_core
from qz_core import BuildContext, QzError, calibrate, convert, resolve_weights
from qz_segmentation import SegmentationLoss
from qz_segmentation.models import (
    QuantizableASPP,
    deeplabv3_mobilenet_v3_large,
    fcn_resnet50,
    lraspp_mobilenet_v3_large,
)

from conftest import ALL_MODELS, WITH_AUX, assert_fully_supported, assert_matches_torchvision

SMALL = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
LARGE = sorted(set(ALL_MODELS) - set(SMALL))


@pytest.mark.parametrize("name", SMALL)
def test_matches_torchvision(name, tmp_path):
    assert_matches_torchvision(name, tmp_path)


@pytest.mark.parametrize("name", [n for n in SMALL if n in WITH_AUX])
def test_matches_torchvision_with_aux(name, tmp_path):
    assert_matches_torchvision(name, tmp_path, aux_loss=True)


@pytest.mark.zoo
@pytest.mark.parametrize("aux_loss", [False, True])
@pytest.mark.parametrize("name", LARGE)
def test_matches_torchvision_zoo(name, aux_loss, tmp_path):
    assert_matches_torchvision(name, tmp_path, aux_loss=aux_loss)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("fcn_resnet50", {"aux_loss": True}),
        ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
        ("lraspp_mobilenet_v3_large", {}),
    ],
)
def test_fully_supported(name, kwargs, tmp_path):
    assert_fully_supported(name, tmp_path, **kwargs)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL_MODELS)
def test_fully_supported_zoo(name, tmp_path):
    assert_fully_supported(name, tmp_path, **({"aux_loss": True} if name in WITH_AUX else {}))


def _aux_state(tmp_path, **kwargs) -> str:
    path = tmp_path / "fcn.pth"
    torch.save(fcn_resnet50(**kwargs).state_dict(), path)
    return str(path)


def test_checkpoint_with_aux_needs_aux_loss(tmp_path):
    path = _aux_state(tmp_path, aux_loss=True)
    with pytest.raises(QzError, match=r"aux_classifier\.0\.weight.*aux_loss=True"):
        fcn_resnet50(weights=path)
    assert fcn_resnet50(weights=path, aux_loss=True).aux_classifier is not None


def test_checkpoint_without_aux_refuses_aux_loss(tmp_path):
    with pytest.raises(QzError, match=r"aux_classifier\.0\.weight.*aux_loss=False"):
        fcn_resnet50(weights=_aux_state(tmp_path), aux_loss=True)


def test_wrong_checkpoint_names_the_keys(tmp_path):
    state = lraspp_mobilenet_v3_large().state_dict()
    state["classifier.extra.weight"] = state.pop("classifier.high_classifier.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(QzError, match=r"missing keys: classifier\.high_classifier\.weight.*classifier\.extra\.weight"):
        lraspp_mobilenet_v3_large(weights=str(tmp_path / "bad.pth"))
    torch.save(lraspp_mobilenet_v3_large(num_classes=5).state_dict(), tmp_path / "five.pth")
    with pytest.raises(QzError, match=r"shape mismatches: classifier\.low_classifier\.weight"):
        lraspp_mobilenet_v3_large(weights=str(tmp_path / "five.pth"))
    assert lraspp_mobilenet_v3_large(weights=str(tmp_path / "five.pth"), num_classes=5)(torch.randn(1, 3, 64, 64))[
        "out"
    ].shape == (1, 5, 64, 64)


def test_bad_configurations_raise():
    with pytest.raises(QzError, match="no auxiliary classifier"):
        lraspp_mobilenet_v3_large(aux_loss=True)
    with pytest.raises(QzError, match="num_classes must be a positive integer"):
        deeplabv3_mobilenet_v3_large(num_classes=0)
    with pytest.raises(QzError, match="Invalid weights 'COCO'"):
        fcn_resnet50(weights="COCO")


def test_aux_loss_and_backbone_weights_hook():
    """Enum weights hold the aux head (as torchvision builds them); full weights need no backbone weights."""
    spec = qz_core.get_model_spec("fcn_resnet50")
    enum = BuildContext(resolve_weights("DEFAULT", spec.weights_enum), progress=False, quantize=False, is_qat=False)
    with pytest.raises(QzError, match=r"COCO_WITH_VOC_LABELS_V1 hold an aux classifier: aux_loss must be True"):
        spec.adjust_kwargs(enum, {"aux_loss": False})
    kwargs = {"weights_backbone": "DEFAULT"}
    spec.adjust_kwargs(enum, kwargs)
    assert kwargs == {"weights_backbone": None, "aux_loss": True}
    none = BuildContext(None, progress=False, quantize=False, is_qat=False)
    kwargs = {"weights_backbone": None}
    spec.adjust_kwargs(none, kwargs)
    assert kwargs == {"weights_backbone": None}
    # An INT8 file holds every weight: the recipe leaves the backbone weights out.
    assert lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=3).qz_recipe.model_kwargs == {"num_classes": 3}


def test_fusion_covers_backbone_and_heads():
    model = deeplabv3_mobilenet_v3_large(quantize=True, is_qat=False, backend="x86", aux_loss=True)
    aspp = model.classifier[0]
    assert isinstance(aspp, QuantizableASPP)
    fused = {name: type(m).__name__ for name, m in model.named_modules()}
    assert fused["backbone.1.block.0.0"] == "ConvReLU2d"  # backbone, fused by MobileNetV3's own rules
    assert fused["classifier.0.convs.0.0"] == "ConvReLU2d"  # ASPP 1x1 branch
    assert fused["classifier.0.convs.1.0"] == "ConvReLU2d"  # atrous branch
    assert fused["classifier.0.convs.4.1"] == "ConvReLU2d"  # pooling branch
    assert fused["classifier.0.project.0"] == "ConvReLU2d"
    assert fused["classifier.1"] == "ConvReLU2d"
    assert fused["aux_classifier.0"] == "ConvReLU2d"
    blocks = deeplabv3_mobilenet_v3_large(quantize=True, backend="x86", fuse_level="blocks")
    kinds = {name: type(m).__name__ for name, m in blocks.named_modules()}
    assert kinds["backbone.1.block.0.0"] == "ConvReLU2d" and kinds["classifier.1"] == "Conv2d"


@torch.no_grad()
def test_int8_model_is_int8_to_the_logits():
    model = lraspp_mobilenet_v3_large(quantize=True, backend="qnnpack", activation_observer="minmax")
    x = torch.randn(2, 3, 64, 64)
    calibrate(model, [x], progress=False)
    int8 = convert(model)
    head = int8.classifier
    assert isinstance(head.cbr[0], nni.quantized.ConvReLU2d) and isinstance(head.low_classifier, nnq.Conv2d)
    assert isinstance(head.mul, nnq.QFunctional) and isinstance(head.add, nnq.QFunctional)
    out = int8(x)
    assert list(out) == ["out"] and out["out"].dtype == torch.float32 and out["out"].shape == (2, 21, 64, 64)
    assert qz_core.count_float_islands(int8) == 0


def test_qat_with_segmentation_loss_then_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(
        quantize=True, is_qat=True, backend="x86", aux_loss=True, num_classes=3, activation_observer="minmax"
    )
    x = torch.randn(2, 3, 64, 64)
    masks = torch.randint(0, 3, (2, 64, 64))
    masks[:, :8] = 255
    losses = qz_core.train_qat(model, [(x, masks)] * 2, SegmentationLoss(), epochs=3, lr=1e-3, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # the same two images: the loss falls
    int8 = convert(model)
    qz_core.save_quantized(int8, tmp_path / "int8.pt")
    loaded = qz_core.load_quantized(tmp_path / "int8.pt")
    with torch.no_grad():
        expected, got = int8(x), loaded(x)
    assert list(got) == ["out", "aux"]
    assert torch.equal(expected["out"], got["out"]) and torch.equal(expected["aux"], got["aux"])


def test_segmentation_loss():
    logits = torch.randn(2, 4, 8, 8)
    aux = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    ignored = target.clone()
    ignored[:, :4] = 255
    loss = SegmentationLoss()
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(loss({"out": logits}, target), ce(logits, target))
    assert torch.allclose(loss({"out": logits, "aux": aux}, target), ce(logits, target) + 0.5 * ce(aux, target))
    assert torch.allclose(loss(logits, ignored), ce(logits[:, :, 4:], target[:, 4:]))
    with pytest.raises(QzError, match="'out'"):
        loss({"aux": aux}, target)
