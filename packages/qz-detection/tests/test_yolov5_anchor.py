"""The original anchor-based YOLOv5 (release v7.0): float equality, original checkpoints read without code, INT8, QAT.

The ``yolov5`` package on PyPI (release v7.0 packaged) installs here but does not import: it needs
``pkg_resources``, which setuptools 81+ no longer ships. The reference is therefore a test-only copy of
v7.0's model classes (``models/common.py``, ``models/yolo.py``) registered under the module names the
original checkpoints pickle (``models.common``, ``models.yolo``, or the package's ``yolov5.models.*``)
while a checkpoint is written, and removed before qz reads it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import qz_core
from qz_core import QzError, calibrate, convert, count_float_islands
from qz_core.tools.support import probe_model
from qz_core.tools.testing import assert_support_contract
from qz_detection._ultralytics import import_ultralytics
from qz_detection.detector import DetectionBatch
from qz_detection.models import yolov5
from qz_detection.models.anchor_yolo import AnchorYoloLoss, normalized_targets
from qz_detection.task import TASK

ASSETS = Path(import_ultralytics("ultralytics").__file__).parent / "assets"
V5_NAMES = ["yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"]


# ---- A copy of YOLOv5 v7.0's model classes (models/common.py, models/yolo.py), the float reference. ----


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_, 1, 1), Conv(c1, c_, 1, 1), Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1, 1), Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    stride = None

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(anchors), len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _make_grid(self, nx, ny, i):
        shape = 1, self.na, ny, nx, 2
        y, x = torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def _yaml(scale: str, nc: int) -> dict:
    """models/yolov5{scale}.yaml of release v7.0."""
    depth, width = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}[scale]
    backbone = [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]]]
    backbone += [[-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]]]
    backbone += [[-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]], [-1, 1, "SPPF", [1024, 5]]]
    head = [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 6], 1, "Concat", [1]]]
    head += [[-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]]]
    head += [[[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]]]
    head += [[[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]]]
    head += [[[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]]
    anchors = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    return dict(nc=nc, depth_multiple=depth, width_multiple=width, anchors=anchors, backbone=backbone, head=head)


def _parse_model(d: dict) -> tuple[nn.Sequential, list[int]]:
    """models/yolo.py's parse_model, for the rows of the yolov5{n,s,m,l,x} yamls."""
    gd, gw, nc = d["depth_multiple"], d["width_multiple"], d["nc"]
    classes = {"Conv": Conv, "C3": C3, "SPPF": SPPF, "Concat": Concat, "Detect": Detect, "nn.Upsample": nn.Upsample}
    layers, save, ch = [], [], [3]
    for i, (f, n, name, args) in enumerate(d["backbone"] + d["head"]):
        m, args = classes[name], [d[a] if a in ("nc", "anchors") else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if m in (Conv, C3, SPPF):
            c1, c2 = ch[f], math.ceil(args[0] * gw / 8) * 8
            args = [c1, c2, *args[1:]]
            if m is C3:
                args.insert(2, n)
                n = 1
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m is Detect:
            args.append([ch[x] for x in f])
        else:
            c2 = ch[f]
        module = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        module.i, module.f = i, f
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        ch = [] if i == 0 else ch
        ch.append(c2 if m is not Detect else 0)
    assert nc == layers[-1].nc
    return nn.Sequential(*layers), sorted(save)


class DetectionModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.yaml = cfg
        self.model, self.save = _parse_model(copy.deepcopy(cfg))
        self.names = [str(i) for i in range(cfg["nc"])]
        detect = self.model[-1]
        detect.stride = torch.tensor([8.0, 16.0, 32.0])  # v7.0 measures them with a 256 px forward pass
        detect.anchors /= detect.stride.view(-1, 1, 1)
        self.stride = detect.stride
        for mi, s in zip(detect.m, detect.stride, strict=True):
            b = mi.bias.view(detect.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99))
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)
        for m in self.modules():
            if type(m) is nn.BatchNorm2d:
                m.eps, m.momentum = 1e-3, 0.03

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


_V7_CLASSES = {"common": (Conv, Bottleneck, C3, SPPF, Concat), "yolo": (Detect, DetectionModel)}


@contextlib.contextmanager
def _v7_modules(namespace: str):
    """v7.0's classes as ``{namespace}.common.*`` and ``{namespace}.yolo.*`` (as checkpoints pickle them), then gone."""
    saved = {cls: cls.__module__ for classes in _V7_CLASSES.values() for cls in classes}
    parts = namespace.split(".")
    fakes = {name: types.ModuleType(name) for name in (".".join(parts[: i + 1]) for i in range(len(parts)))}
    for file, classes in _V7_CLASSES.items():
        fakes[f"{namespace}.{file}"] = module = types.ModuleType(f"{namespace}.{file}")
        for cls in classes:
            cls.__module__ = module.__name__
            setattr(module, cls.__name__, cls)
    previous = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for cls, module_name in saved.items():
            cls.__module__ = module_name
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _reference(scale: str = "n", nc: int = 80, seed: int = 0) -> DetectionModel:
    """v7.0's float model, random weights with random BatchNorm statistics (seeded)."""
    torch.manual_seed(seed)
    model = DetectionModel(_yaml(scale, nc)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
    return model


def _write_original_checkpoint(reference: DetectionModel, path: Path, namespace: str = "models") -> None:
    """A checkpoint laid out as v7.0's train.py writes it mid-training (model, EMA, optimizer, numpy fitness)."""
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.937)
    checkpoint = {
        "epoch": 3,
        "best_fitness": np.array([0.25]),
        "model": copy.deepcopy(reference).half(),
        "ema": copy.deepcopy(reference).half(),
        "updates": 120,
        "optimizer": optimizer.state_dict(),
        "opt": {"weights": "yolov5n.pt", "imgsz": 640, "hyp": {"lr0": 0.01, "anchor_t": 4.0}},
        "git": {"remote": "https://github.com/ultralytics/yolov5", "branch": "master", "commit": "915bbf2"},
        "date": "2022-11-22T10:00:00",
    }
    with _v7_modules(namespace):
        torch.save(checkpoint, path)


def _as_predictions(decoded: torch.Tensor) -> torch.Tensor:
    """v7.0's (B, anchors, 5 + classes) output as qz's (B, 4 + classes, anchors) with objectness x class scores."""
    return torch.cat((decoded[..., :4], decoded[..., 5:] * decoded[..., 4:5]), -1).transpose(1, 2)


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


# ---- The tests. ----


def test_variants_are_registered_with_v7_depth_and_width():
    assert set(V5_NAMES) <= set(qz_core.list_models("yolov5*", task="detection"))
    for name in V5_NAMES:
        spec = qz_core.get_model_spec(name)
        assert spec.family == "yolo" and spec.input_size == (640, 640) and spec.probe_kwargs == {"export": True}
        assert spec.fixed_kwargs == {"scale": name[-1]} and "anchor-based" in spec.description
    n, s = yolov5.yolov5n(), yolov5.yolov5s()
    assert n.model[0].conv.out_channels == 16 and s.model[0].conv.out_channels == 32
    for ours, scale in ((n, "n"), (s, "s")):
        reference = _reference(scale)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
        assert torch.equal(ours.head.anchors, reference.model[-1].anchors)  # in stride units, as v7.0 keeps them


def test_float_model_equals_yolov5_v7_exactly(tmp_path):
    reference = _reference("n")
    torch.save(reference.state_dict(), tmp_path / "v7.pth")
    model = yolov5.yolov5n(weights=str(tmp_path / "v7.pth"))
    x = torch.rand(2, 3, 160, 192)
    with torch.no_grad():
        predictions, raw = model(x)
        decoded, levels = reference(x)
    assert torch.equal(raw["decoded"], decoded)
    assert all(torch.equal(a, b) for a, b in zip(raw["levels"], levels, strict=True))
    assert torch.equal(predictions, _as_predictions(decoded))
    assert predictions.shape == (2, 84, 3 * (20 * 24 + 10 * 12 + 5 * 6))
    model.train(), reference.train()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), reference(x), strict=True))


@pytest.mark.parametrize("namespace", ["models", "yolov5.models"])
def test_original_checkpoint_loads_without_its_code(namespace, tmp_path):
    reference = _reference("n", nc=3)
    reference.names = {0: "cat", 1: "dog", 2: "bird"}
    path = tmp_path / "best.pt"
    _write_original_checkpoint(reference, path, namespace)
    assert f"{namespace}.common" not in sys.modules
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):  # torch's own safe load refuses it
        torch.load(path, weights_only=True)

    model = qz_core.get_model("yolov5n", weights=path)
    assert f"{namespace}.common" not in sys.modules and f"{namespace}.yolo" not in sys.modules
    assert model.class_names == ["cat", "dog", "bird"]
    assert model.qz_recipe.model_kwargs == {"scale": "n", "num_classes": 3}
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        (_, ours), (float32, _) = model(x), reference(x)
        half_rounded, _ = copy.deepcopy(reference).half().float()(x)
    assert torch.equal(ours["decoded"], half_rounded)  # the file holds fp16 weights, read as they are
    torch.testing.assert_close(ours["decoded"], float32, rtol=1e-2, atol=0.05)  # within fp16 rounding of FP32
    with pytest.raises(QzError, match="scale='s' does not match weights"):
        yolov5.yolov5s(weights=str(path))


def test_restricted_unpickler_runs_nothing_and_names_what_it_refuses(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Payload(), "epoch": -1}, tmp_path / "evil.pt")
    with pytest.raises(QzError, match=r"names (posix|os)\.system") as refused:
        yolov5.yolov5n(weights=str(tmp_path / "evil.pt"))
    assert not marker.exists() and "Nothing in it was run" in str(refused.value)

    class Eval:
        def __reduce__(self):
            return eval, (f"open({str(marker)!r}, 'w')",)

    torch.save({"model": Eval()}, tmp_path / "eval.pt")
    with pytest.raises(QzError, match=r"names builtins\.eval"):
        yolov5.read_yolov5_checkpoint(tmp_path / "eval.pt")
    assert not marker.exists()


def test_damaged_or_modelless_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    _write_original_checkpoint(_reference("n"), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name in ("cut.pt", "junk.pt"):
        with pytest.raises(QzError, match="Cannot read YOLOv5 checkpoint") as error:
            yolov5.yolov5n(weights=str(tmp_path / name))
        assert len(str(error.value).splitlines()) == 1
    torch.save({"model": [1, 2], "epoch": 0}, tmp_path / "empty.pt")
    with pytest.raises(QzError, match="holds no YOLOv5 model under 'ema' or 'model'"):
        yolov5.yolov5n(weights=str(tmp_path / "empty.pt"))


def test_yolov5n_fully_supported(tmp_path):
    """PTQ and QAT reach INT8 on x86 and qnnpack with no float island; FP32 and INT8 ONNX agree in onnxruntime."""
    x = torch.randn(1, 3, 128, 128)
    result = probe_model("yolov5n", example_input=x, work_dir=tmp_path, build_kwargs={"activation_observer": "minmax"})
    assert_support_contract(result, float_islands=0)


def test_int8_head_convs_then_float_decoding(tmp_path):
    prepared = yolov5.yolov5n(quantize=True, backend="qnnpack")
    calibrate(prepared, [torch.rand(2, 3, 128, 128)], progress=False)
    int8 = convert(prepared)
    qz_core.save_quantized(int8, tmp_path / "yolov5n_int8.pt")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(qz_core.load_quantized(tmp_path / "yolov5n_int8.pt")(x)[0], int8(x)[0])
    assert count_float_islands(int8) == 0
    assert all(type(conv).__module__.startswith("torch.ao.nn.quantized") for conv in int8.head.m)
    assert type(int8.model[2].cv1.conv).__module__.startswith("torch.ao.nn.quantized")
    with torch.no_grad():
        predictions, raw = int8(torch.rand(1, 3, 128, 128))
    assert predictions.dtype == torch.float32 and predictions.shape == (1, 84, 3 * (16**2 + 8**2 + 4**2))
    boxes, scores = predictions[:, :4], predictions[:, 4:]
    assert (
        torch.isfinite(predictions).all() and (scores >= 0).all() and (scores <= 1).all() and (boxes[:, 2:] >= 0).all()
    )


def _targets(images: torch.Tensor) -> list[dict]:
    size = (images.shape[-2], images.shape[-1])
    boxes = [
        torch.tensor([[20.0, 30.0, 70.0, 90.0], [60.0, 10.0, 120.0, 50.0]]),
        torch.tensor([[5.0, 40.0, 100.0, 120.0]]),
    ]
    labels = [torch.tensor([1, 7]), torch.tensor([3])]
    return [
        {"boxes": b, "labels": k, "category_ids": k + 1, "image_size": size} for b, k in zip(boxes, labels, strict=True)
    ]


@dataclass(frozen=True)
class DarknetDecoding:
    """YOLOv4's decoding (``sigmoid * scale_x_y - (scale_x_y - 1) / 2``, ``exp(wh) * anchor``), own cell only."""

    scale_xy: float = 1.05
    neighbour_reach: float = 0.0

    def decode(self, raw, grid, anchor_grid, stride):
        xy, wh, conf = raw.split((2, 2, raw.shape[-1] - 4), -1)
        xy = (xy.sigmoid() * self.scale_xy - (self.scale_xy - 1) / 2 + grid) * stride
        return torch.cat((xy, wh.exp() * anchor_grid, conf.sigmoid()), -1)

    def cell_boxes(self, xy, wh, anchors):
        return torch.cat((xy.sigmoid() * self.scale_xy - (self.scale_xy - 1) / 2, wh.exp() * anchors), 1)


def test_loss_matches_targets_to_anchors_and_cells_for_either_decoding():
    model = yolov5.yolov5n()
    images = torch.rand(2, 3, 128, 128)
    targets = normalized_targets(_targets(images), (128, 128))
    assert targets.shape == (3, 6) and torch.equal(targets[:, :2], torch.tensor([[0.0, 1], [0, 7], [1, 3]]))
    model.train()
    levels = model(images)
    v5_loss = AnchorYoloLoss(model.head)
    box, obj, cls = v5_loss.components(levels, targets)
    assert box > 0 and obj > 0 and cls > 0
    no_targets = v5_loss.components(levels, targets[:0])
    assert no_targets[0] == 0 and no_targets[2] == 0 and no_targets[1] > 0  # objectness alone: all background

    darknet_loss = AnchorYoloLoss(model.head, decoding=DarknetDecoding())
    assert darknet_loss.components(levels, targets)[0] != box
    own_total = extra_total = 0
    for i, level in enumerate(levels):  # YOLOv5 also assigns a pair to the neighbour cells nearest its centre
        own, more = darknet_loss._assign(i, level, targets), v5_loss._assign(i, level, targets)
        n = len(own.image)
        for key in ("image", "anchor", "gi", "gj"):
            assert torch.equal(getattr(more, key)[:n], getattr(own, key))
        own_cells = torch.stack((own.image, own.anchor, own.gi, own.gj), 1)
        for image, anchor, gi, gj in torch.stack((more.image, more.anchor, more.gi, more.gj), 1)[n:].tolist():
            same = own_cells[(own_cells[:, 0] == image) & (own_cells[:, 1] == anchor)]
            # A next-door cell; the own cell again for a centre exactly on a cell edge, as in YOLOv5.
            assert ((same[:, 2] - gi).abs() + (same[:, 3] - gj).abs() <= 1).any()
        own_total, extra_total = own_total + n, extra_total + len(more.image) - n
    assert own_total > 0 and own_total < extra_total <= 2 * own_total
    model.eval()
    with torch.no_grad():
        v5_boxes = model(images)[0][:, :4]
        model.head.decoding = DarknetDecoding()
        assert not torch.allclose(v5_boxes, model(images)[0][:, :4])


def test_qat_loss_falls_on_a_fixed_batch_then_converts():
    model = qz_core.get_model("yolov5n", quantize=True, is_qat=True, backend="qnnpack")
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    batch = DetectionBatch(images, _targets(images))
    before = model.head.m[0].weight.detach().clone()
    losses = qz_core.train_qat(model, [batch], step_loss=TASK.training_loss, epochs=3, lr=0.01, progress=False)
    assert all(math.isfinite(v) for v in losses) and losses[0] > 0
    assert losses[-1] < losses[0], losses
    assert not torch.equal(before, model.head.m[0].weight)
    int8 = convert(model.eval())
    with torch.no_grad():
        predictions, _ = int8(images)
    assert predictions.shape == (2, 84, 1008) and torch.isfinite(predictions).all()


def test_qz_predict_draws_on_bus_jpg(tmp_path, capsys):
    from qz_core.cli import main

    weights = tmp_path / "yolov5n.pt"
    _write_original_checkpoint(_reference("n"), weights)
    assert main(["predict", "yolov5n", str(ASSETS / "bus.jpg"), "--weights", str(weights), "--out", str(tmp_path)]) == 0
    (written,) = [Path(line) for line in capsys.readouterr().out.split()]
    assert written == tmp_path / "bus_yolov5n.png" and written.is_file()
    with Image.open(written) as picture, Image.open(ASSETS / "bus.jpg") as bus:
        assert picture.width >= bus.width and picture.height > bus.height
