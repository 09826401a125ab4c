"""YOLOv4 from darknet cfgs and .weights files: parsing, the file format, float equality, INT8 on both engines, QAT."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.ao.nn import quantized as nnq

import qz_core
from qz_core import QzError, calibrate, convert, count_float_islands, estimate_bn_stats
from qz_core.tools.support import probe_model
from qz_core.tools.support.probe import sqnr
from qz_core.tools.testing import assert_support_contract
from qz_detection._ultralytics import import_ultralytics
from qz_detection.detector import random_targets
from qz_detection.evaluate import YoloFormat, detection_format
from qz_detection.models.darknet import (
    YOLOV4_CFG,
    DarknetYOLO,
    parse_cfg,
    read_darknet_weights,
    write_darknet_weights,
)
from qz_detection.models.yolov4 import QuantizableMish, QuantizableYOLOv4, yolov4_detection_loss
from qz_detection.task import TASK

BUS = Path(import_ultralytics("ultralytics").__file__).parent / "assets" / "bus.jpg"
# AlexeyAB's released yolov4.weights: 257,717,640 bytes (64,363,101 parameters); yolov4-tiny.weights: 24,251,276.
YOLOV4_WEIGHTS_BYTES, YOLOV4_PARAMETERS, YOLOV4_TINY_WEIGHTS_BYTES = 257_717_640, 64_363_101, 24_251_276


def _section(kind: str, **options: object) -> str:
    return "\n".join([f"[{kind}]", *(f"{k}={v}" for k, v in options.items())]) + "\n\n"


def _conv(filters: int, size: int = 1, stride: int = 1, activation: str = "mish", bn: int = 1) -> str:
    norm = {"batch_normalize": 1} if bn else {}
    return _section("convolutional", **norm, filters=filters, size=size, stride=stride, pad=1, activation=activation)


def _yolo(mask: str, classes: int = 3, scale_x_y: float = 1.05) -> str:
    anchors = "10,14, 23,27, 37,58, 81,82, 135,169, 344,319"
    return _section("yolo", mask=mask, anchors=anchors, classes=classes, num=6, scale_x_y=scale_x_y)


# A narrow YOLOv4: Mish CSP stages with residual shortcuts, route groups, SPP max pools, leaky neck, two heads.
NARROW_CFG = (
    _section("net", width=128, height=128, channels=3)
    + _conv(8, 3)  # 0
    + _conv(16, 3, 2)  # 1
    + _conv(8)  # 2
    + _section("route", layers=-2)  # 3
    + _conv(8)  # 4
    + _conv(8)  # 5
    + _conv(8, 3)  # 6
    + _section("shortcut", **{"from": -3}, activation="linear")  # 7
    + _conv(8)  # 8
    + _section("route", layers="-1,-7")  # 9
    + _conv(16)  # 10
    + _conv(32, 3, 2)  # 11: stride 4
    + _section("route", layers=-1, groups=2, group_id=1)  # 12
    + _conv(16, 3, activation="leaky")  # 13
    + _section("maxpool", size=2, stride=2)  # 14: stride 8
    + _conv(32, 3, 2, activation="leaky")  # 15: stride 16
    + _section("maxpool", stride=1, size=5)  # 16
    + _section("route", layers=-2)  # 17
    + _section("maxpool", stride=1, size=9)  # 18
    + _section("route", layers="-1,-3,-4")  # 19
    + _conv(32, activation="leaky")  # 20
    + _conv(24, activation="linear", bn=0)  # 21
    + _yolo("3,4,5")  # 22
    + _section("route", layers=-3)  # 23
    + _section("upsample", stride=2)  # 24: stride 8
    + _section("route", layers="-1,14")  # 25
    + _conv(16, 3, activation="leaky")  # 26
    + _conv(24, activation="linear", bn=0)  # 27
    + _yolo("0,1,2")  # 28
)
NARROW_MISH_LAYERS = 9


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _settled(cfg: str, size: int = 128, seed: int = 0) -> DarknetYOLO:
    """The float darknet model of ``cfg``, random weights with BatchNorm statistics of random images."""
    torch.manual_seed(seed)
    model = DarknetYOLO(cfg)
    estimate_bn_stats(model, [torch.rand(2, 3, size, size) for _ in range(2)])
    return model.eval()


def _first_layers_of_yolov4(count: int) -> str:
    """The shipped yolov4.cfg cut after its first ``count`` layers, with a one-class head."""
    sections = YOLOV4_CFG.split("\n\n")
    return "\n\n".join(sections[: count + 1]) + "\n\n" + _conv(18, activation="linear", bn=0) + _yolo("0,1,2", 1)


def _darknet_file(path: Path, model: DarknetYOLO, rng: np.random.Generator, version=(0, 2, 5)) -> dict[str, np.ndarray]:
    """Writes a .weights file by hand (darknet's layout), distinct values per tensor; returns what went where."""
    header = np.array(version, "<i4").tobytes()
    header += np.array([123456], "<i8" if version[0] * 10 + version[1] >= 2 else "<i4").tobytes()
    written, body = {}, []
    for index, block in model.conv_blocks():
        n, weight_shape = block.conv.out_channels, tuple(block.conv.weight.shape)
        if isinstance(block.bn, nn.BatchNorm2d):
            order = [("bn.bias", (n,)), ("bn.weight", (n,)), ("bn.running_mean", (n,)), ("bn.running_var", (n,))]
        else:
            order = [("conv.bias", (n,))]
        for name, shape in [*order, ("conv.weight", weight_shape)]:
            values = rng.uniform(0.5, 1.5, shape).astype("<f4")
            written[f"layers.{index}.{name}"] = values
            body.append(values.tobytes())
    path.write_bytes(header + b"".join(body))
    return written


def test_shipped_cfgs_are_alexeyabs_networks():
    blocks = parse_cfg(YOLOV4_CFG)
    kinds = [b.kind for b in blocks[1:]]
    assert len(kinds) == 162 and blocks[0].get_int("width") == 608
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"convolutional": 110, "route": 21, "shortcut": 23, "maxpool": 3, "upsample": 2, "yolo": 3}
    assert [i for i, k in enumerate(kinds) if k == "yolo"] == [139, 150, 161]
    assert blocks[1 + 119].options["layers"] == "85" and blocks[1 + 129].options["layers"] == "54"
    assert sum(b.options.get("activation") == "mish" for b in blocks) == 72
    model = DarknetYOLO("yolov4.cfg")
    assert sum(p.numel() for p in model.parameters()) == YOLOV4_PARAMETERS
    floats = sum(t.numel() for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert 20 + 4 * floats == YOLOV4_WEIGHTS_BYTES
    heads = model.yolo_layers
    assert [h.scale_x_y for h in heads] == [1.2, 1.1, 1.05] and model.stride.tolist() == [8, 16, 32]
    assert heads[0].anchors.tolist() == [[12, 16], [19, 36], [40, 28]] and heads[2].anchors[2].tolist() == [459, 401]

    tiny = DarknetYOLO("yolov4-tiny.cfg")
    assert len(tiny.layers) == 38 and tiny.heads == [30, 37] and tiny.stride.tolist() == [32, 16]
    assert tiny.layers[3].groups == 2 and tiny.layers[3].group_id == 1
    assert tiny.yolo_layers[1].anchors.tolist() == [[23, 27], [37, 58], [81, 82]]  # mask 1,2,3
    tiny_floats = sum(t.numel() for k, t in tiny.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert 20 + 4 * tiny_floats == YOLOV4_TINY_WEIGHTS_BYTES


def test_cfg_parsing_rules_and_errors(tmp_path):
    text = "# comment\n[net]\n width = 64 \nheight=64\n\n; other comment\n[convolutional]\nfilters=18\nsize=1\n"
    text += "activation=linear\n[yolo]\nmask=0,1,2\nanchors=1,2, 3,4, 5,6\nclasses=1\n"
    blocks = parse_cfg(text)
    assert [b.kind for b in blocks] == ["net", "convolutional", "yolo"] and blocks[0].options["width"] == "64"
    assert blocks[1].line == 7 and blocks[2].get_ints("anchors") == [1, 2, 3, 4, 5, 6]
    model = DarknetYOLO(text)
    assert model.layers[0].conv.bias is not None and isinstance(model.layers[0].bn, nn.Identity)
    # num_classes resizes the conv before each [yolo]; a cfg file path works as cfg text does.
    (tmp_path / "my.cfg").write_text(text)
    resized = DarknetYOLO(tmp_path / "my.cfg", num_classes=4)
    assert resized.layers[0].conv.out_channels == 3 * 9 and resized.num_classes == 4
    with pytest.raises(QzError, match="line 2: expected"):
        parse_cfg("[net]\nwidth 64\n")
    with pytest.raises(QzError, match=r"line 2: activation='gelu' is not supported"):
        DarknetYOLO("[net]\n[convolutional]\nactivation=gelu\n")
    with pytest.raises(QzError, match=r"line 2: layer \[local\] is not supported"):
        DarknetYOLO("[net]\n[local]\nfilters=2\n")
    with pytest.raises(QzError, match=r"\[yolo\] with 3 anchors and 1 classes needs 18 channels; layer 0 gives 16"):
        DarknetYOLO(text.replace("filters=18", "filters=16"))
    with pytest.raises(QzError, match="neither one of yolov4.cfg"):
        DarknetYOLO("missing.cfg")


@pytest.mark.parametrize("version", [(0, 2, 5), (0, 1, 0)])
def test_weights_file_loads_layer_by_layer(version, tmp_path):
    """A hand-written file: int64 ``seen`` from version 0.2 on, int32 before; every tensor lands where written."""
    cfg = _first_layers_of_yolov4(11)  # the stem and the first CSP stage: mish, route, shortcut
    model = DarknetYOLO(cfg)
    written = _darknet_file(tmp_path / "net.weights", model, np.random.default_rng(0), version)
    header, floats = read_darknet_weights(tmp_path / "net.weights")
    assert (header.major, header.minor, header.revision, header.seen) == (*version, 123456)
    assert len(floats) == sum(v.size for v in written.values())
    loaded = qz_core.get_model("yolov4", cfg=cfg, weights=tmp_path / "net.weights")
    state = loaded.state_dict()
    assert len(written) == 5 * 8 + 2  # 8 BatchNorm convs (4 BatchNorm tensors and weights each) and the head conv
    for key, values in written.items():
        assert torch.equal(state[key], torch.from_numpy(values)), key


def test_weights_file_of_the_wrong_size_is_refused_in_one_line(tmp_path):
    cfg = _first_layers_of_yolov4(11)
    path = tmp_path / "net.weights"
    _darknet_file(path, DarknetYOLO(cfg), np.random.default_rng(0))
    data = path.read_bytes()
    (tmp_path / "short.weights").write_bytes(data[: 20 + 4 * (4 * 32 + 32 * 3 * 9 + 10)])  # into layer 1
    (tmp_path / "long.weights").write_bytes(data + bytes(8))
    (tmp_path / "odd.weights").write_bytes(data + bytes(3))
    expected = {
        "short": r"ends inside layer 1 \(convolutional, 64 filters\), which needs 18688 floats but 10 are left",
        "long": r"8 bytes \(2 floats\) are left after the last convolutional layer 11",
        "odd": "are not whole float32 values",
    }
    for name, message in expected.items():
        with pytest.raises(QzError, match=message) as error:
            qz_core.get_model("yolov4", cfg=cfg, weights=tmp_path / f"{name}.weights")
        assert "\n" not in str(error.value) and f"{name}.weights" in str(error.value)


def test_tiny_weights_round_trip_and_unconverted_model_equals_float(tmp_path):
    reference = _settled("yolov4-tiny.cfg")
    write_darknet_weights(reference, tmp_path / "tiny.weights")
    assert (tmp_path / "tiny.weights").stat().st_size == YOLOV4_TINY_WEIGHTS_BYTES
    model = qz_core.get_model("yolov4_tiny", weights=tmp_path / "tiny.weights")
    assert isinstance(model, QuantizableYOLOv4) and model.qz_recipe.model_kwargs == {"cfg": "yolov4-tiny.cfg"}
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        (ours, raw), (theirs, raw_theirs) = model(x), reference(x)
    assert ours.shape == (2, 84, 3 * (5 * 5 + 10 * 10)) and torch.equal(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(raw, raw_theirs, strict=True))
    model.train(), reference.train()
    assert all(torch.equal(a, b) for a, b in zip(model(x), reference(x), strict=True))  # raw maps for the loss


def test_full_yolov4_unconverted_equals_float_then_int8_on_both_engines():
    """The full network at 96 px: bit-equal unconverted; PTQ keeps one float island per Mish layer.

    The support contract runs on yolov4-tiny and a narrow cfg: 110 random-weight layers amplify any noise
    (in float, input noise of half an 8-bit step alone leaves the head maps at 17-24 dB), so the full
    network's INT8 head maps (measured 12.6-16 dB) say little more than that quantization works.
    """
    reference = _settled("yolov4.cfg", size=96)
    model = qz_core.get_model("yolov4")
    model.load_state_dict(reference.state_dict())
    assert sum(isinstance(m, QuantizableMish) for m in model.modules()) == 72
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        expected, expected_raw = reference(x)
        assert torch.equal(model(x)[0], expected)
    for engine in ("x86", "qnnpack"):
        prepared = qz_core.prepare_built(copy.deepcopy(model), backend=engine)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
        calibrate(prepared, [x], progress=False)
        int8 = convert(prepared)
        assert count_float_islands(int8) == 72
        assert isinstance(int8.layers[105].act, nnq.LeakyReLU) and isinstance(int8.layers[7].skip_add, nnq.QFunctional)
        with torch.no_grad():
            predictions, raw = int8(x)
        assert predictions.shape == expected.shape == (1, 84, 3 * (12 * 12 + 6 * 6 + 3 * 3))
        assert torch.isfinite(predictions).all() and sqnr(raw, expected_raw) > 8, engine


def test_yolov4_tiny_fully_supported(tmp_path):
    """PTQ and QAT on both engines, FP32 and INT8 ONNX of the decoded predictions.

    onnxruntime's INT8 head maps agree with PyTorch's INT8 ones within a few quantization steps (measured
    33-39 dB), but darknet's ``exp(t_wh) * anchor`` turns a step into tens of pixels for the 344 px anchor:
    its largest box difference to FP32 measured 1.2 to 2.8 times PyTorch's own (random weights), hence ``slack``.
    """
    torch.manual_seed(0)
    result = probe_model(
        "yolov4_tiny",
        example_input=torch.rand(1, 3, 160, 160),
        work_dir=tmp_path,
        build_kwargs={"activation_observer": "minmax"},
    )
    assert_support_contract(result, slack=3.0, float_islands=0)


def test_narrow_yolov4_with_mish_islands_fully_supported(tmp_path):
    """CSP stages with Mish, shortcuts, route groups, SPP, upsampling: PTQ, QAT, ONNX on both engines."""
    torch.manual_seed(0)
    result = probe_model(
        "yolov4",
        example_input=torch.rand(1, 3, 128, 128),
        work_dir=tmp_path,
        build_kwargs={"activation_observer": "minmax", "cfg": NARROW_CFG},
    )
    assert_support_contract(result, float_islands=NARROW_MISH_LAYERS)


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_int8_mish_lookup_is_the_islands_result(engine, monkeypatch):
    prepared = qz_core.get_model("yolov4", cfg=NARROW_CFG, quantize=True, backend=engine, export=True)
    calibrate(prepared, [torch.rand(1, 3, 128, 128)], progress=False)
    int8 = convert(prepared)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        q = int8.layers[0].conv(int8.quant(x))
        mish = int8.layers[0].act
        lookup, outputs = mish(q), int8(x)
        assert len(mish.tables) == 1  # the lookup ran
        monkeypatch.setattr(QuantizableMish, "use_lookup", False)
        island, island_outputs = mish(q), int8(x)
    assert (lookup.q_scale(), lookup.q_zero_point()) == (island.q_scale(), island.q_zero_point())
    steps = (lookup.int_repr().int() - island.int_repr().int()).abs()
    assert steps.max() <= 1 and (steps == 0).float().mean() > 0.999  # float rounding may flip a tie
    assert sqnr(outputs, island_outputs) > 30


def test_decoding_follows_darknet_rules():
    model = qz_core.get_model("yolov4", cfg=NARROW_CFG)
    head = model.yolo_layers[1]  # stride 8, anchors (10,14) (23,27) (37,58), scale_x_y 1.05
    raw = torch.zeros(1, 3 * 8, 16, 16)
    raw.view(1, 3, 8, 16, 16)[0, 2, :, 5, 7] = torch.tensor([2.0, -1.0, 0.5, 0.25, 3.0, 1.0, -1.0, 0.0])
    decoded = head.decode(raw, (128, 128)).view(1, 7, 3, 16, 16)[0, :, 2, 5, 7]
    sigmoid = torch.sigmoid
    x = (sigmoid(torch.tensor(2.0)) * 1.05 - 0.025 + 7) * 8
    y = (sigmoid(torch.tensor(-1.0)) * 1.05 - 0.025 + 5) * 8
    w, h = torch.exp(torch.tensor(0.5)) * 37, torch.exp(torch.tensor(0.25)) * 58
    scores = sigmoid(torch.tensor([1.0, -1.0, 0.0])) * sigmoid(torch.tensor(3.0))
    assert torch.allclose(decoded, torch.cat([torch.stack([x, y, w, h]), scores]))


def test_loss_prefers_the_target_box_and_ignores_mismatched_anchors():
    model = qz_core.get_model("yolov4", cfg=NARROW_CFG)
    heads = model.yolo_layers
    raw = [torch.full((1, 24, 8, 8), -8.0), torch.full((1, 24, 16, 16), -8.0)]  # confident background
    # 5 x 5 px, class 1: within 4x of anchor (10, 14) of the stride-8 head only, in its cell (x 5, y 5).
    box = torch.tensor([[1.0, 40.0, 40.0, 45.0, 45.0]])
    baseline = yolov4_detection_loss(heads, raw, [box], (128, 128))
    good = [r.clone() for r in raw]
    cell = good[1].view(1, 3, 8, 16, 16)[0, 0, :, 5, 5]
    offset = (torch.tensor([42.5, 42.5]) / 8 - 5 + 0.025) / 1.05  # sigmoid(t_xy) that decodes to the centre
    cell[:2] = torch.log(offset / (1 - offset))
    cell[2:4] = torch.log(torch.tensor([5 / 10, 5 / 14]))  # exp(t_wh) * anchor = 5 x 5
    cell[4:] = torch.tensor([8.0, -8.0, 8.0, -8.0])  # an object, of class 1
    assert yolov4_detection_loss(heads, good, [box], (128, 128)) < 0.05 * baseline
    # A box 10 times wider than every anchor of both heads is matched by none: only objectness is learnt.
    huge = torch.tensor([[0.0, 0.0, 60.0, 127.0, 66.0]])
    no_match = yolov4_detection_loss(heads, raw, [huge], (128, 128))
    empty = yolov4_detection_loss(heads, raw, [torch.zeros(0, 5)], (128, 128))
    assert torch.equal(no_match, empty)


def test_qat_loss_falls_on_a_fixed_batch_then_converts():
    model = qz_core.get_model("yolov4", cfg=NARROW_CFG, quantize=True, is_qat=True, backend="qnnpack")
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    batch = TASK.collate(list(zip(images, random_targets(images, num_classes=3), strict=True)))
    losses = qz_core.train_qat(model, [batch], step_loss=TASK.training_loss, epochs=3, lr=0.01, progress=False)
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 0
    assert losses[-1] < losses[0], losses
    int8 = convert(model)
    with torch.no_grad():
        predictions, _ = int8(images)
    assert predictions.shape == (2, 7, 3 * (8 * 8 + 16 * 16)) and torch.isfinite(predictions).all()


def test_evaluation_format_and_predict_command_on_a_photo(tmp_path):
    """``qz eval``'s YoloFormat reads the model's output; ``qz predict`` draws bus.jpg with darknet weights."""
    spec = qz_core.get_model_spec("yolov4")
    assert isinstance(detection_format(spec), YoloFormat) and detection_format(spec).size == 608
    assert type(qz_core.get_model_transforms("yolov4_tiny")).__name__ == "LetterBox"
    reference = _settled("yolov4-tiny.cfg", size=160)
    write_darknet_weights(reference, tmp_path / "tiny.weights")
    model = qz_core.get_model("yolov4_tiny", weights=tmp_path / "tiny.weights").eval()
    image = torch.rand(3, 120, 200)
    boxes, scores, labels = YoloFormat(size=160, conf_thres=0.0).detect(model, image)
    assert len(boxes) > 0 and (boxes[:, 2] <= 200).all() and (labels < 80).all()
    from qz_core.cli import main

    assert (
        main(["predict", "yolov4_tiny", str(BUS), "--weights", str(tmp_path / "tiny.weights"), "--out", str(tmp_path)])
        == 0
    )
    with Image.open(tmp_path / "bus_yolov4_tiny.png") as picture, Image.open(BUS) as bus:
        assert picture.size == (bus.width, bus.height + 28)


def test_user_cfg_is_stored_in_the_recipe_and_int8_reloads(tmp_path):
    (tmp_path / "narrow.cfg").write_text(NARROW_CFG)
    prepared = qz_core.get_model("yolov4", cfg=tmp_path / "narrow.cfg", num_classes=2, quantize=True, export=True)
    assert prepared.qz_recipe.model_kwargs == {"cfg": NARROW_CFG, "num_classes": 2, "export": True}
    calibrate(prepared, [torch.rand(1, 3, 128, 128)], progress=False)
    int8 = convert(prepared)
    qz_core.save_quantized(int8, tmp_path / "narrow_int8.pt")
    (tmp_path / "narrow.cfg").unlink()
    loaded = qz_core.load_quantized(tmp_path / "narrow_int8.pt")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x)) and int8(x).shape == (1, 4 + 2, 3 * (8 * 8 + 16 * 16))


def test_fuse_levels():
    blocks = qz_core.get_model("yolov4", cfg=NARROW_CFG, quantize=True, fuse_level="blocks")
    assert isinstance(blocks.layers[5].bn, nn.Identity) and isinstance(blocks.layers[6].bn, nn.Identity)  # residual
    assert isinstance(blocks.layers[0].bn, nn.BatchNorm2d)  # the stem is in no residual unit
    unfused = qz_core.get_model("yolov4", cfg=NARROW_CFG, quantize=True, fuse_level="none")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in unfused.modules()) == 13
