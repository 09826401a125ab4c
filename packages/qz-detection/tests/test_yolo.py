"""Quantizable YOLOv3u/v5u/v8/11 (ultralytics): float equality, strict weights, PTQ/QAT on both engines, ONNX.

The default run uses the nano variants at 128-160 px; every registered variant runs under ``-m zoo``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import read_image

import qz_core
from qz_core import QzError, calibrate, convert, count_float_islands, estimate_bn_stats
from qz_core.tools.support import float_difference, probe_model
from qz_core.tools.testing import assert_support_contract
from qz_detection._ultralytics import import_ultralytics
from qz_detection.models import yolo
from qz_detection.models.yolo import QuantizableYOLO, yolo_detection_loss

ultralytics = import_ultralytics("ultralytics")
DetectionModel = import_ultralytics("ultralytics.nn.tasks").DetectionModel
non_max_suppression = import_ultralytics("ultralytics.utils.nms").non_max_suppression

YOLO_NAMES = [
    *("yolov3u", "yolov3_sppu", "yolov3_tinyu", "yolov5nu", "yolov5su", "yolov5mu", "yolov5lu", "yolov5xu"),
    *(f"yolov8{scale}" for scale in "nsmlx"),
    *(f"yolo11{scale}" for scale in "nsmlx"),
]
NANO_NAMES = ["yolov5nu", "yolov8n", "yolo11n"]
ASSETS = Path(ultralytics.__file__).parent / "assets"


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _reference(name: str, **kwargs) -> DetectionModel:
    """ultralytics' own float model of ``name``, random weights (seeded)."""
    torch.manual_seed(0)
    return DetectionModel(qz_core.get_model_spec(name).fixed_kwargs["cfg"], verbose=False, **kwargs).eval()


def _photo(file: str, size: int) -> torch.Tensor:
    """One of ultralytics' bundled photos as a (1, 3, size, size) batch in [0, 1], as YOLO takes it."""
    image = read_image(str(ASSETS / file)).float().div(255).unsqueeze(0)
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _relative_rms(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).pow(2).mean().sqrt() / reference.std())


def _attention_blocks(name: str) -> int:
    """How many attention blocks ultralytics' model of ``name`` has (YOLO11's C2PSA; none before)."""
    return sum(type(m).__name__ == "Attention" for m in _reference(name).modules())


def assert_fully_supported(name: str, tmp_path, input_size: int = 128, slack: float = 1.5) -> None:
    """PTQ and QAT reach INT8 on x86 and qnnpack, float only in attention; FP32 and INT8 ONNX agree.

    The probe runs the deployment output (``export=True``: decoded predictions only). onnxruntime's
    INT8 output is about as close to FP32 as PyTorch's INT8 output is. The only float islands are
    YOLO11's attention products, one per attention block.
    """
    x = torch.randn(1, 3, input_size, input_size)
    # No export=True here: the spec's probe_kwargs must supply it (as for `qz support`).
    result = probe_model(name, example_input=x, work_dir=tmp_path, build_kwargs={"activation_observer": "minmax"})
    assert_support_contract(result, slack=slack, float_islands=_attention_blocks(name))


def test_variants_are_registered_as_detection_models():
    assert set(YOLO_NAMES) <= set(qz_core.list_models("yolo*", task="detection"))
    for name in YOLO_NAMES:
        spec = qz_core.get_model_spec(name)
        assert spec.input_size == (640, 640)
        assert spec.weights_enum is None
        assert spec.family == "yolo"
        assert spec.deployed_ratio_target == 0.4
        assert spec.probe_kwargs == {"export": True}
        assert type(qz_core.get_model_transforms(name)).__name__ == "LetterBox"
    # The anchor-free models carry their checkpoints' names (yolov5nu.pt); plain names are the anchor-based originals.
    assert not {"yolov3", "yolov3_spp", "yolov3_tiny"} & set(qz_core.list_models())
    assert "anchor" in qz_core.get_model_spec("yolov5n").description.lower()
    assert qz_core.get_model_spec("yolov5nu").description.startswith("YOLOv5u nano")
    assert qz_core.get_model_spec("yolov5xu").fixed_kwargs == {"cfg": "yolov5x.yaml"}
    assert qz_core.get_model_spec("yolo11m").description.startswith("YOLO11 medium")


def test_scale_letter_picks_width_and_depth():
    # yolov5.yaml's scales: n = width 0.25, s = 0.50; depth 0.33 for both.
    n, s = yolo.yolov5nu(), yolo.yolov5su()
    assert n.model[0].conv.out_channels == 16 and s.model[0].conv.out_channels == 32
    assert len(n.model[2].m) == len(s.model[2].m) == 1
    assert sum(p.numel() for p in n.parameters()) == sum(p.numel() for p in _reference("yolov5nu").parameters())


@pytest.mark.parametrize("name", NANO_NAMES)
def test_float_model_equals_ultralytics(name, tmp_path):
    reference = _reference(name)
    x = torch.randn(2, 3, 160, 160)
    # Eval output: (decoded predictions, {"boxes", "scores", "feats"}), every tensor bit-equal.
    assert float_difference(name, reference, x, tmp_path) == 0.0
    model = qz_core.get_model(name, weights=str(tmp_path / f"{name}_reference.pth"))
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1]["feats"], theirs[1]["feats"], strict=True))
    # Training mode returns the raw head outputs ultralytics' loss takes.
    model.train(), reference.train()
    ours, theirs = model(x), reference(x)
    assert torch.equal(ours["boxes"], theirs["boxes"]) and torch.equal(ours["scores"], theirs["scores"])


def test_ultralytics_checkpoint_loads_with_its_class_count(tmp_path):
    reference = _reference("yolov5nu", nc=3)
    reference.names = {0: "cat", 1: "dog", 2: "bird"}
    path = tmp_path / "best.pt"
    # The layout ultralytics writes: a pickled half-precision model under "model" (and "ema").
    torch.save({"epoch": -1, "model": copy.deepcopy(reference).half(), "ema": None}, path)
    model = yolo.yolov5nu(weights=str(path))
    assert model.model[-1].nc == 3 and model.class_names == ["cat", "dog", "bird"]
    assert model.qz_recipe.model_kwargs == {"cfg": "yolov5n.yaml", "num_classes": 3}
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x)[0], reference.half().float()(x)[0])
    with pytest.raises(QzError, match="num_classes=80 does not match weights"):
        yolo.yolov5nu(weights=str(path), num_classes=80)
    with pytest.raises(QzError, match="yolov5nu has cfg='yolov5n.yaml'"):
        yolo.yolov5nu(cfg="yolov5s.yaml")


@pytest.mark.parametrize("name", NANO_NAMES)
def test_checkpoint_written_by_ultralytics_loads_with_class_names(name, tmp_path):
    """``ultralytics.YOLO("yolov5nu.yaml").save`` writes the layout of yolov5nu.pt (as qz names it), offline.

    It loads strictly: a missing, unexpected or misshapen key would raise.
    """
    names = {i: f"class{i}" for i in range(80)} | {0: "person", 5: "bus"}
    model = ultralytics.YOLO(f"{name}.yaml")
    model.model.names = names
    path = tmp_path / f"{name}.pt"
    model.save(path)
    ours = qz_core.get_model(name, weights=path)
    assert ours.class_names[0] == "person" and ours.class_names[5] == "bus" and len(ours.class_names) == 80
    assert ours.qz_recipe.model_kwargs["num_classes"] == 80
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        # The file holds half-precision weights (as ultralytics ships them): the reference is rounded alike.
        assert torch.equal(ours(x)[0], model.model.half().float().eval()(x)[0])


def test_building_yolo_leaves_torch_save_and_image_open_alone():
    code = (
        "import torch, PIL.Image; save, open_ = torch.save, PIL.Image.open; import qz_core; "
        "qz_core.get_model('yolov5nu'); import ultralytics; "
        "print(torch.save is save, PIL.Image.open is open_, 'ultralytics' in __import__('sys').modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["True", "True", "True"], out.stdout + out.stderr


def test_wrong_checkpoint_raises_naming_the_keys(tmp_path):
    state = _reference("yolov5nu").state_dict()
    del state["model.0.conv.weight"]
    state["model.99.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(QzError, match=r"missing keys: model\.0\.conv\.weight.*unexpected keys: model\.99\.extra"):
        yolo.yolov5nu(weights=str(tmp_path / "broken.pth"))
    torch.save(_reference("yolov5su").state_dict(), tmp_path / "yolov5s.pth")
    with pytest.raises(QzError, match=r"shape mismatches: model\.0\.conv\.weight"):
        yolo.yolov5nu(weights=str(tmp_path / "yolov5s.pth"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(QzError, match="Cannot read YOLO weights"):
        yolo.yolov5nu(weights=str(tmp_path / "junk.pt"))
    with pytest.raises(QzError, match="does not exist"):
        yolo.yolov5nu(weights=str(tmp_path / "missing.pt"))


def test_newer_yolo_blocks_are_refused_by_name():
    with pytest.raises(QzError, match="SCDown"):
        QuantizableYOLO("yolov10n.yaml")
    with pytest.raises(QzError, match="A2C2f"):
        QuantizableYOLO("yolo12n.yaml")


def test_fuse_levels():
    all_fused = yolo.yolov5nu(quantize=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in all_fused.modules())
    blocks = yolo.yolov5nu(quantize=True, fuse_level="blocks")
    assert isinstance(blocks.model[0].bn, nn.BatchNorm2d)  # the stem is no block
    assert isinstance(blocks.model[2].cv1.bn, nn.Identity)  # C3 convs are fused
    unfused = yolo.yolov5nu(quantize=True, fuse_level="none")
    reference_norms = sum(isinstance(m, nn.BatchNorm2d) for m in _reference("yolov5nu").modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in unfused.modules()) == reference_norms == 69


def test_yolov5nu_fully_supported(tmp_path):
    assert_fully_supported("yolov5nu", tmp_path)


def test_yolov8n_fully_supported(tmp_path):
    assert_fully_supported("yolov8n", tmp_path)


def test_yolo11n_fully_supported(tmp_path):
    assert_fully_supported("yolo11n", tmp_path)


def test_yolo11_attention_is_int8_around_one_float_island():
    """The qkv, positional and projection convs and the residual adds are INT8; softmax(q^T k) v is float."""
    prepared = yolo.yolo11n(quantize=True, backend="qnnpack", fuse_level="blocks")
    attention = prepared.model[10].m[0].attn
    assert isinstance(attention.qkv.bn, nn.Identity) and isinstance(attention.pe.bn, nn.Identity)  # fused
    assert count_float_islands(prepared) == 1 == _attention_blocks("yolo11n")
    calibrate(prepared, [torch.rand(1, 3, 128, 128)], progress=False)
    int8 = convert(prepared)
    attention = int8.model[10].m[0].attn
    assert qz_core.is_quantized(int8) and count_float_islands(int8) == 1
    assert type(attention.qkv.conv).__module__.startswith("torch.ao.nn.quantized")
    assert type(attention.attend.module).__name__ == "AttentionCore"  # the island's inside stays float
    assert type(int8.model[10].m[0].ffn_add).__name__ == "QFunctional"
    with torch.no_grad():
        predictions, _ = int8(torch.rand(1, 3, 128, 128))
    assert predictions.shape == (1, 84, 336) and torch.isfinite(predictions).all()


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_int8_on_a_real_photo_agrees_with_fp32(engine, tmp_path):
    """Calibrated on zidane.jpg, run on bus.jpg. Random weights make boxes meaningless, not agreement.

    BatchNorm statistics are re-estimated on both photos (they are weights); the INT8 model's
    ranges come from zidane.jpg only. A random-weight YOLO amplifies any perturbation (2% input
    noise becomes 38% at its last C3 in float), so the bounds are loose next to a trained model's.
    """
    bus, zidane = _photo("bus.jpg", 160), _photo("zidane.jpg", 160)
    torch.manual_seed(0)
    model = yolo.yolov5nu()
    estimate_bn_stats(model, [torch.cat([zidane, zidane.flip(-1), bus, bus.flip(-1)])])
    torch.save(model.state_dict(), tmp_path / "photo.pth")
    prepared = yolo.yolov5nu(weights=str(tmp_path / "photo.pth"), quantize=True, backend=engine)
    calibrate(prepared, [zidane, zidane.flip(-1)], progress=False)
    int8 = convert(prepared)
    assert count_float_islands(int8) == 0
    with torch.no_grad():
        fp32_out, int8_out = model(bus), int8(bus)
    assert int8_out[0].shape == fp32_out[0].shape == (1, 84, 525)  # (4 + 80 classes, 20² + 10² + 5² anchors)
    assert torch.isfinite(int8_out[0]).all() and torch.isfinite(int8_out[1]["scores"]).all()
    # Measured: 0.12 (x86, 7-bit activations) and 0.07 (qnnpack) of the boxes' spread, in pixels.
    assert _relative_rms(fp32_out[0][:, :4], int8_out[0][:, :4]) < 0.2
    # Class logits: the head's bias (about -10) dominates them; their variation must still agree.
    logits = torch.stack([fp32_out[1]["scores"].flatten(), int8_out[1]["scores"].flatten()])
    assert torch.corrcoef(logits)[0, 1] > 0.75  # measured 0.83 (x86), 0.93 (qnnpack)
    # NMS runs on the INT8 output as on the FP32 output (it is not part of the model).
    detections = non_max_suppression(int8_out[0], conf_thres=0.0, iou_thres=0.5, max_det=10)
    assert len(detections) == 1 and detections[0].shape == (10, 6)


@pytest.mark.parametrize("name", NANO_NAMES)
def test_qat_step_with_ultralytics_loss_then_convert(name):
    model = qz_core.get_model(name, quantize=True, is_qat=True, backend="qnnpack")
    images = torch.rand(2, 3, 128, 128)
    targets = {
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[1.0], [7.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5]]),  # normalized xywh
    }
    before = model.model[-1].cv3[0][2].weight.detach().clone()
    loss = yolo_detection_loss(model)
    losses = qz_core.train_qat(model, [(images, targets)], loss, epochs=3, lr=0.01, progress=False)
    assert len(losses) == 3 and losses[0] > 0 and torch.isfinite(torch.tensor(losses)).all()
    assert losses[-1] < losses[0], losses  # the same batch three times: the loss falls
    assert not torch.equal(before, model.model[-1].cv3[0][2].weight)
    int8 = convert(model)
    assert qz_core.is_quantized(int8)
    with torch.no_grad():
        predictions, raw = int8(images)
    assert predictions.shape == (2, 84, 336) and torch.isfinite(predictions).all()


def test_int8_model_saves_and_loads(tmp_path):
    prepared = yolo.yolov5nu(quantize=True, backend="qnnpack", activation_observer="minmax", export=True)
    calibrate(prepared, [torch.rand(1, 3, 128, 128)], progress=False)
    int8 = convert(prepared)
    qz_core.save_quantized(int8, tmp_path / "yolov5nu_int8.pt")
    loaded = qz_core.load_quantized(tmp_path / "yolov5nu_int8.pt")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))


@pytest.mark.zoo
@pytest.mark.parametrize("name", YOLO_NAMES)
def test_zoo_float_equality(name, tmp_path):
    x = torch.randn(1, 3, 128, 128)
    assert float_difference(name, _reference(name), x, tmp_path) == 0.0


@pytest.mark.zoo
@pytest.mark.parametrize("name", YOLO_NAMES)
def test_zoo_fully_supported(name, tmp_path):
    assert_fully_supported(name, tmp_path)
