"""COCO evaluation: mAP on a fixture with known answers, label maps both ways, errors, `qz eval detection`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights

import qz_core
from qz_core import ModelSpec, QzError, calibrate, convert, define_model, save_quantized
from qz_detection.coco import CategoryMap
from qz_detection.evaluate import evaluate_detector, letterbox, unletterbox

os.environ.setdefault("YOLO_OFFLINE", "1")

TV_STUB, YOLO_STUB = "qz_test_box_detector", "qz_test_yolo_box_detector"
WIDTH, HEIGHT = 64, 48  # fixture images; every box is BOX_W wide so a shift has a known IoU
BOX_W = 20
CATEGORY_IDS = (1, 3, 18)  # COCO's person, car, dog: object of class k is a rectangle lit in channel k
# image -> [(channel, x, y, height)]; rectangles BOX_W wide, at least 4 px from the right edge.
OBJECTS = {
    "a": [(0, 4, 4, 20), (2, 36, 10, 30)],
    "b": [(1, 10, 6, 16)],
    "c": [(0, 2, 20, 24), (1, 26, 2, 10), (2, 40, 30, 14)],
    "d": [(2, 8, 8, 32)],
}


def _boxes_of(x: Tensor) -> list[tuple[int, Tensor]]:
    """(channel, xyxy box) of every channel lit above 0.5 in the image ``x`` (3, H, W)."""
    found = []
    for channel in range(3):
        ys, xs = torch.nonzero(x[channel] > 0.5, as_tuple=True)
        if len(xs):
            found.append((channel, torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()))
    return found


class BoxDetector(nn.Module):
    """Finds each lit channel's rectangle exactly: an identity 1x1 conv (INT8 after convert), then float.

    ``torchvision=True``: takes a list of images, returns torchvision's dicts with ``labels[k]`` for
    channel k, boxes shifted right by ``shift`` pixels. Otherwise YOLO's output: (1, 4 + 3, 3)
    xywh boxes and one-hot class scores, one anchor per channel.
    """

    def __init__(
        self,
        torchvision: bool = True,
        labels: tuple[int, ...] = CATEGORY_IDS,
        shift: float = 0.0,
        num_classes: int = 91,
    ) -> None:
        super().__init__()
        self.torchvision, self.labels, self.shift, self.num_classes = torchvision, labels, shift, num_classes
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()
        self.stride = torch.tensor([32.0])

    def forward(self, images: list[Tensor] | Tensor) -> list[dict[str, Tensor]] | tuple[Tensor, dict]:
        lit = [self.dequant(self.conv(self.quant(image[None])))[0] for image in images]
        if self.torchvision:
            outputs = []
            for x in lit:
                found = _boxes_of(x)
                boxes = torch.stack([box for _, box in found]) + torch.tensor([self.shift, 0, self.shift, 0])
                labels = torch.tensor([self.labels[c] for c, _ in found])
                outputs.append({"boxes": boxes, "scores": torch.ones(len(found)), "labels": labels})
            return outputs
        predictions = torch.zeros(len(lit), 4 + 3, 3)
        for i, x in enumerate(lit):
            for channel, (x1, y1, x2, y2) in _boxes_of(x):
                predictions[i, :4, channel] = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
                predictions[i, 4 + channel, channel] = 1.0
        return predictions, {}

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Nothing to fuse."""


if not qz_core.list_models(TV_STUB):
    _STUB = ModelSpec(name=TV_STUB, task="detection", family="qz_test", make_model=BoxDetector)
    define_model(_STUB)
    define_model(_STUB.variant(name=YOLO_STUB, family="yolo", input_size=(64, 64), fixed_kwargs={"torchvision": False}))


def _coco_fixture(root, objects=OBJECTS, split="val2017", calib=("e",)):
    """``objects`` as a COCO layout (PNG images, instances_<split>.json) and a calibration image folder."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "calib").mkdir()
    images, annotations = [], []
    for image_id, (name, rectangles) in enumerate(objects.items(), start=1):
        image = Image.new("RGB", (WIDTH, HEIGHT))
        for channel, x, y, h in rectangles:
            image.paste(tuple(255 * (c == channel) for c in range(3)), (x, y, x + BOX_W, y + h))
            box = [x, y, BOX_W, h]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[channel],
                 "bbox": box, "area": BOX_W * h, "iscrowd": 0}
            )  # fmt: skip
        image.save(root / split / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.png", "width": WIDTH, "height": HEIGHT})
    for name in calib:
        Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255)).save(root / "calib" / f"{name}.png")
    categories = [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, ("person", "car", "dog"), strict=True)]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return root


@pytest.fixture
def coco(tmp_path):
    return _coco_fixture(tmp_path / "coco")


def test_exact_boxes_score_one_in_fp32_and_int8(coco):
    result = evaluate_detector(
        TV_STUB, data=coco, quantize="ptq", calib_images=coco / "calib", backend="x86", progress=False
    )
    assert result.images == 4 and result.label_map.startswith("category_id")
    for scores in (result.fp32, result.int8):
        assert (scores.map, scores.map50, scores.ar100) == pytest.approx((1.0, 1.0, 1.0))
        assert scores.detections == 7 and scores.images == 4
    assert result.delta == pytest.approx({"map": 0.0, "map50": 0.0, "ar100": 0.0})
    assert result.int8_source == "PTQ" and result.backend == "x86" and "1 images fed" in result.calibration
    assert "INT8 PTQ x86" in result.table() and "1.000" in result.table()


def test_shifted_boxes_lose_the_thresholds_above_their_iou(coco):
    """Shifted right by s, a box BOX_W wide has IoU (BOX_W - s) / (BOX_W + s) with its object: matched at
    the COCO thresholds up to that IoU only. s = 2: IoU 18/22 = 0.818 passes 0.50..0.80, 7 of 10 thresholds."""
    result = evaluate_detector(TV_STUB, data=coco, model_kwargs={"shift": 2.0}, progress=False)
    assert result.fp32.map == pytest.approx(0.7) and result.fp32.ar100 == pytest.approx(0.7)
    assert result.fp32.map50 == pytest.approx(1.0)
    far = evaluate_detector(TV_STUB, data=coco, model_kwargs={"shift": 12.0}, progress=False)  # IoU 8/32
    assert far.fp32.map == 0.0 and far.fp32.map50 == 0.0 and result.int8 is None


@pytest.mark.parametrize("image_size", [64, 128])  # scale 1 and 2; 48 px high images padded to the stride
def test_yolo_letterbox_and_contiguous_labels_score_one(coco, image_size):
    """YOLO's class k is the k-th sorted category id (1, 3, 18); boxes go back through the letterbox."""
    result = evaluate_detector(
        YOLO_STUB, data=coco, image_size=image_size, quantize="ptq", backend="qnnpack", progress=False
    )
    assert result.label_map.startswith("contiguous") and result.images == 3  # one image held out
    assert (result.fp32.map, result.int8.map, result.int8.ar100) == pytest.approx((1.0, 1.0, 1.0))


def test_letterbox_round_trip():
    image = torch.rand(3, 45, 70)
    batch, scale, pad = letterbox(image, 96, stride=32)
    assert batch.shape == (1, 3, 64, 96) and pad == (0, 1)  # 45 * 96/70 = 61.7 -> 62 rows, padded to 64
    boxes = torch.tensor([[0.0, 0.0, 70.0, 45.0], [10.0, 5.0, 30.5, 40.0]])
    in_letterbox = boxes * torch.tensor([scale[0], scale[1]] * 2) + torch.tensor([pad[0], pad[1]] * 2)
    assert torch.allclose(unletterbox(in_letterbox, scale, pad, (45, 70)), boxes, atol=1e-4)


def test_category_maps_both_ways():
    """torchvision's 91-index labels are COCO's category ids; YOLO's 80 classes are the sorted ids in order."""
    names = SSDLite320_MobileNet_V3_Large_Weights.DEFAULT.meta["categories"]  # 91 entries, index = category id
    coco_ids = [i for i, n in enumerate(names) if n not in ("__background__", "N/A")]
    assert len(coco_ids) == 80
    yolo = CategoryMap.for_model("contiguous", coco_ids, num_labels=80)
    assert yolo.to_category_ids([0, 2, 16, 79]) == [1, 3, 18, 90]
    assert yolo.to_labels([1, 3, 18, 90]) == [0, 2, 16, 79]
    from ultralytics.utils import ROOT, YAML

    yolo_names = YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"]
    assert [names[i] for i in yolo.to_category_ids(range(80))] == [yolo_names[k] for k in range(80)]
    torchvision = CategoryMap.for_model("category_id", coco_ids, num_labels=91)
    assert torchvision.to_category_ids([1, 3, 18, 90]) == [1, 3, 18, 90] == torchvision.to_labels([1, 3, 18, 90])
    custom = CategoryMap.for_model("contiguous", [7, 5], num_labels=3, first_label=1)  # torchvision + background
    assert custom.to_category_ids([1, 2]) == [5, 7]
    with pytest.raises(QzError, match="has 80 categories but the model predicts 90 classes"):
        CategoryMap.for_model("contiguous", coco_ids, num_labels=91, first_label=1)
    with pytest.raises(QzError, match=r"Category ids up to 90 do not fit a model with 80 label indices"):
        CategoryMap.for_model("category_id", coco_ids, num_labels=80)
    with pytest.raises(QzError, match="Invalid label map 'coco80'"):
        CategoryMap.for_model("coco80", coco_ids, num_labels=80)


def test_label_maps_through_the_evaluation(coco):
    # A torchvision-style head with a background class and contiguous labels 1..3.
    custom = evaluate_detector(
        TV_STUB, data=coco, label_map="contiguous", num_classes=4, model_kwargs={"labels": (1, 2, 3)}, progress=False
    )
    assert custom.fp32.map == pytest.approx(1.0)
    with pytest.raises(QzError, match="has 3 categories but the model predicts 90 classes"):
        evaluate_detector(TV_STUB, data=coco, label_map="contiguous", progress=False)
    with pytest.raises(QzError, match="Category ids up to 18 do not fit a model with 3 label indices"):
        evaluate_detector(YOLO_STUB, data=coco, label_map="category_id", progress=False)


def test_int8_file_and_cli_json(coco, tmp_path, capsys):
    from qz_core.cli import main

    prepared = qz_core.get_model(TV_STUB, quantize=True)
    calibrate(prepared, [torch.rand(1, 3, 8, 8)], progress=False)
    save_quantized(convert(prepared), tmp_path / "int8.pt")
    out = tmp_path / "result.json"
    code = main(
        ["eval", "detection", "--int8", str(tmp_path / "int8.pt"), "--data", str(coco / "val2017"),
         "--annotations", str(coco / "annotations/instances_val2017.json"), "--limit", "2", "--workers", "0",
         "--no-progress", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["model"] == TV_STUB and payload["fp32"] is None and payload["images"] == 2
    assert payload["int8"]["map"] == pytest.approx(1.0) and payload["int8_source"].endswith("int8.pt")
    assert "mAP50" in capsys.readouterr().out


def test_bad_folders_files_and_models_are_clear_errors(coco, tmp_path, capsys):
    with pytest.raises(QzError, match="COCO folder .* does not exist"):
        evaluate_detector(TV_STUB, data=tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QzError, match=r"is not a COCO folder: it lacks annotations/instances_val2017\.json"):
        evaluate_detector(TV_STUB, data=tmp_path / "empty", progress=False)
    with pytest.raises(QzError, match=r"Invalid split 'val2018'\. Did you mean 'val2017'\?"):
        evaluate_detector(TV_STUB, data=coco, split="val2018", progress=False)
    with pytest.raises(QzError, match="annotation file .*absent.json' does not exist"):
        evaluate_detector(TV_STUB, data=coco / "val2017", annotations=tmp_path / "absent.json", progress=False)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(QzError, match="is not valid JSON"):
        evaluate_detector(TV_STUB, data=coco / "val2017", annotations=broken, progress=False)
    broken.write_text('{"images": []}')
    with pytest.raises(QzError, match="not a COCO instances file: it lacks annotations, categories"):
        evaluate_detector(TV_STUB, data=coco / "val2017", annotations=broken, progress=False)
    (coco / "val2017" / "c.png").unlink()
    with pytest.raises(QzError, match=r"lists images that .*val2017' lacks: c\.png"):
        evaluate_detector(TV_STUB, data=coco, progress=False)
    with pytest.raises(QzError, match="detection model; 'resnet18' is a classification model"):
        evaluate_detector("resnet18", data=coco, progress=False)
    with pytest.raises(QzError, match=r"Invalid model name 'yolov5q'\. Did you mean .*'yolov5n'"):
        evaluate_detector("yolov5q", data=coco, progress=False)
    from qz_core.cli import main

    assert main(["eval", "detection", "--model", TV_STUB, "--data", str(coco), "--split", "test2017"]) == 2
    assert "Invalid split 'test2017'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("ssdlite320_mobilenet_v3_large", {"backend": "x86"}),
        ("yolov5nu", {"backend": "qnnpack", "num_classes": 3, "image_size": 64}),
    ],
)
def test_real_detectors_run_fp32_and_int8(tmp_path, name, kwargs):
    """Random weights: the numbers mean nothing, but both rows come out of the whole path, in [0, 1].

    minmax observers: converting SSDLite's 139 histogram observers alone takes about a minute here."""
    coco = _coco_fixture(tmp_path / "coco", {**OBJECTS, "e": OBJECTS["a"]})
    result = evaluate_detector(
        name,
        data=coco,
        quantize="ptq",
        activation_observer="minmax",
        calib_batches=1,
        limit=2,
        progress=False,
        **kwargs,
    )
    assert result.images == 2 and "1 of the 5 images" in result.calibration
    for scores in (result.fp32, result.int8):
        assert all(0.0 <= v <= 1.0 for v in (scores.map, scores.map50, scores.ar100)) and scores.images == 2
    assert result.fp32.detections > 0
