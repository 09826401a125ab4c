"""The detection task: real photos of mixed sizes in, batches per model kind, QAT losses, predictions drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

import qz_core
from qz_core import QzError, calibrate, convert
from qz_core.tools.testing import assert_cli_refuses, assert_task_commands_documented
from qz_detection._ultralytics import import_ultralytics
from qz_detection.detector import DetectionBatch
from qz_detection.task import TASK
from qz_detection.transforms import LetterBox, boxes_from_letterbox, boxes_to_letterbox

ASSETS = Path(import_ultralytics("ultralytics").__file__).parent / "assets"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """bus.jpg (810x1080), zidane.jpg (1280x720) and two skimage photos, plus a hidden file to skip."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("bus.jpg", "zidane.jpg"):
        (folder / name).write_bytes((ASSETS / name).read_bytes())
    Image.fromarray(skdata.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skdata.chelsea()).save(folder / "chelsea.jpg")
    (folder / ".hidden.jpg").write_bytes(b"not an image")
    return folder


def _labelled_folders(root: Path, photos: Path) -> tuple[Path, Path]:
    """The same two photos with two boxes each, as YOLO txt and as COCO json."""
    yolo, coco = root / "yolo", root / "coco"
    for folder in (yolo / "images", yolo / "labels", coco / "images"):
        folder.mkdir(parents=True)
    images, annotations = [], []
    for image_id, name in enumerate(("bus.jpg", "zidane.jpg"), start=1):
        for folder in (yolo / "images", coco / "images"):
            (folder / name).write_bytes((photos / name).read_bytes())
        width, height = Image.open(photos / name).size
        (yolo / "labels" / f"{Path(name).stem}.txt").write_text("0 0.5 0.5 0.4 0.6\n5 0.25 0.3 0.2 0.2\n")
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for category, (x, y, w, h) in ((1, (0.3, 0.2, 0.4, 0.6)), (6, (0.15, 0.2, 0.2, 0.2))):
            box = [x * width, y * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    categories = [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (coco / "instances_train.json").write_text(json.dumps(payload))
    return yolo, coco


def test_calibration_photos_batch_as_a_list_for_torchvision_and_stacked_for_yolo(photos):
    spec = qz_core.get_model_spec("ssdlite320_mobilenet_v3_large")
    dataset = TASK.calibration_data(spec, photos, TASK.transform(spec, None))
    assert len(dataset) == 4  # the hidden file is skipped
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=TASK.collate)))
    inputs = TASK.model_inputs(batch)
    assert isinstance(inputs, list) and len({tuple(x.shape) for x in inputs}) == 4
    model = qz_core.get_model("ssdlite320_mobilenet_v3_large", quantize=True, activation_observer="minmax")
    assert calibrate(model, [batch], inputs=TASK.model_inputs, progress=False) == 1

    spec = qz_core.get_model_spec("yolov5nu")
    dataset = TASK.calibration_data(spec, photos, TASK.transform(spec, None))
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=TASK.collate)))
    assert TASK.model_inputs(batch).shape == (2, 3, 640, 640)
    model = qz_core.get_model("yolov5nu", quantize=True, activation_observer="minmax")
    calibrate(model, [batch], inputs=TASK.model_inputs, progress=False)
    assert qz_core.is_quantized(convert(model))


def test_empty_or_missing_calibration_folder_is_a_clear_error(tmp_path):
    spec = qz_core.get_model_spec("yolov5nu")
    with pytest.raises(QzError, match="does not exist"):
        TASK.calibration_data(spec, tmp_path / "nowhere", LetterBox())
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(QzError, match="holds no images"):
        TASK.calibration_data(spec, tmp_path, LetterBox())


def test_letterbox_boxes_round_trip():
    boxes = torch.tensor([[0.0, 0.0, 810.0, 1080.0], [100.0, 50.0, 300.5, 400.0]])
    inside = boxes_to_letterbox(boxes, (1080, 810), (640, 640))
    assert torch.allclose(inside[0], torch.tensor([80.0, 0.0, 560.0, 640.0]))  # 480 wide, centered
    assert torch.allclose(boxes_from_letterbox(inside, (1080, 810), (640, 640)), boxes, atol=1e-3)
    image = LetterBox(640)(Image.open(ASSETS / "bus.jpg"))
    assert image.shape == (3, 640, 640) and image[:, :, :79].eq(114 / 255).all()


@pytest.mark.parametrize("layout", ["yolo", "coco"])
def test_training_folders_give_a_qat_loss_for_yolo_and_torchvision(tmp_path, photos, layout):
    yolo_folder, coco_folder = _labelled_folders(tmp_path, photos)
    folder = yolo_folder if layout == "yolo" else coco_folder
    spec = qz_core.get_model_spec("yolov5nu")
    dataset = TASK.training_data(spec, folder, LetterBox(160))
    image, target = dataset[0]
    assert image.shape == (3, 160, 160) and target["image_size"] == (1080, 810)
    assert target["labels"].tolist() == ([0, 1] if layout == "coco" else [0, 5])
    assert target["category_ids"].tolist() == ([1, 6] if layout == "coco" else [1, 6])
    assert torch.allclose(target["boxes"][0], torch.tensor([243.0, 216.0, 567.0, 864.0]), atol=0.5)
    batch = TASK.collate([dataset[0], dataset[1]])
    assert isinstance(batch, DetectionBatch) and batch.images.shape == (2, 3, 160, 160)
    model = qz_core.get_model("yolov5nu", quantize=True, is_qat=True, num_classes=6)
    model.train()
    loss = TASK.training_loss(model, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()

    spec = qz_core.get_model_spec("fasterrcnn_mobilenet_v3_large_320_fpn")
    batch = TASK.collate(list(TASK.training_data(spec, folder, TASK.transform(spec, None))))
    assert isinstance(batch.images, list)  # mixed sizes: torchvision detectors resize inside
    model = qz_core.get_model(spec.name, quantize=True, is_qat=True, num_classes=7)
    model.train()
    loss = TASK.training_loss(model, batch)
    assert torch.isfinite(loss) and loss > 0


def test_training_folder_errors_name_the_layouts(tmp_path):
    spec = qz_core.get_model_spec("yolov5nu")
    with pytest.raises(QzError, match="needs one COCO instances"):
        TASK.training_data(spec, tmp_path, LetterBox())
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (32, 24)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(QzError, match=r"a\.txt:1: expected 'cls cx cy w h'"):
        TASK.training_data(spec, tmp_path, LetterBox())


def test_predict_and_draw_on_a_real_photo():
    bus = Image.open(ASSETS / "bus.jpg")
    model = qz_core.get_model("yolov5nu")
    model.conf_thres, model.max_det = 0.0, 5  # random weights: every score is near zero
    spec = qz_core.get_model_spec("yolov5nu")
    (prediction,) = TASK.predict(model, [bus], TASK.transform(spec, None))
    boxes = prediction["boxes"]
    assert boxes.shape == (5, 4) and prediction["labels"].shape == prediction["scores"].shape == (5,)
    assert (boxes[:, 0::2] <= bus.width).all() and (boxes[:, 1::2] <= bus.height).all() and (boxes >= 0).all()
    names = [f"class{i}" for i in range(80)]
    confident = dict(prediction, scores=torch.full((5,), 0.9))
    picture = TASK.draw(bus, confident, names, "yolov5nu FP32")
    assert picture.size == (bus.width, bus.height + 28)
    assert not np.array_equal(np.asarray(picture)[28:], np.asarray(bus.convert("RGB")))
    unsure = TASK.draw(bus, dict(prediction, scores=torch.full((5,), 0.1)), names, "yolov5nu FP32")
    assert np.array_equal(np.asarray(unsure)[28:], np.asarray(bus.convert("RGB")))  # below the drawing threshold

    model = qz_core.get_model("ssdlite320_mobilenet_v3_large")
    spec = qz_core.get_model_spec("ssdlite320_mobilenet_v3_large")
    small = bus.resize((200, 266))
    predictions = TASK.predict(model, [bus, small], TASK.transform(spec, None))
    assert len(predictions) == 2 and all(set(p) == {"boxes", "labels", "scores"} for p in predictions)
    assert (predictions[1]["boxes"][:, 0::2] <= 200 + 1e-3).all()
    assert TASK.draw(small, predictions[1], None, "ssdlite").size == (361, 480 + 28)  # enlarged to be legible


def test_export_module_and_example_training_batch_per_model_kind():
    spec = qz_core.get_model_spec("yolov5nu")
    model = qz_core.get_model("yolov5nu")
    assert type(TASK.export_module(model)).__name__ == "YoloPredictions"
    exported = qz_core.get_model("yolov5nu", **spec.probe_kwargs)
    assert TASK.export_module(exported) is exported
    ssd = qz_core.get_model("ssdlite320_mobilenet_v3_large")
    assert type(TASK.export_module(ssd)).__name__ == "DenseDetector"
    batch = TASK.example_training_batch(qz_core.get_model_spec("ssdlite320_mobilenet_v3_large"))
    assert batch.images.shape == (2, 3, 320, 320) and len(batch.targets) == 2
    ssd.train()
    assert torch.isfinite(TASK.training_loss(ssd, batch))
    with pytest.raises(QzError, match="is not a qz detector"):
        TASK.export_module(torch.nn.Conv2d(3, 3, 1))


def test_demo_command_hook():
    import argparse

    parser = argparse.ArgumentParser()
    assert TASK.add_demo_command(parser) is True
    args = parser.parse_args(["--epochs", "2"])
    assert args.epochs == 2 and callable(args.func)


def test_eval_and_demo_options_all_have_help():
    assert_task_commands_documented(TASK)


@pytest.mark.parametrize(
    ("extra", "option", "value"),
    [
        (["--image-size", "-64"], "--image-size", "'-64'"),
        (["--image-size", "0"], "--image-size", "'0'"),
        (["--limit", "0"], "--limit", "'0'"),
        (["--workers", "-1"], "--workers", "'-1'"),
        (["--num-classes", "0"], "--num-classes", "'0'"),
        (["--calib-batches", "-4"], "--calib-batches", "'-4'"),
    ],
)
def test_eval_refuses_bad_numbers_by_name(extra, option, value, capsys, monkeypatch):
    import importlib

    evaluate = importlib.import_module("qz_detection.evaluate")
    monkeypatch.setattr(evaluate, "evaluate_detector", lambda *a, **k: pytest.fail("the evaluation ran"))
    argv = ["eval", "detection", "--model", "yolov5nu", "--data", "coco", *extra]
    assert assert_cli_refuses(argv, option, value.strip("'"), capsys).startswith("qz eval detection: error:")


@pytest.mark.parametrize(
    ("option", "value"), [("--seed", "-1"), ("--image-size", "-64"), ("--epochs", "0"), ("--num-train", "0")]
)
def test_demo_refuses_bad_numbers_by_name(option, value, capsys):
    assert_cli_refuses(
        ["demo", "--task", "detection", option, value, "--out-dir", "never-written"], option, value, capsys
    )


@pytest.mark.parametrize("model_name", ["yolov8n", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_score_matches_each_model_convention_against_the_batch_targets(model_name, monkeypatch):
    from qz_detection.detector import random_targets

    spec = qz_core.get_model_spec(model_name)
    model = qz_core.get_model(model_name, num_classes=3)
    images = torch.rand(2, 3, 64, 64)
    targets = random_targets(images, num_classes=3)
    key = "labels" if spec.family == "yolo" else "category_ids"

    def detect_targets(inputs, sizes, shift=0.0):
        return [{"boxes": t["boxes"] + shift, "labels": t[key], "scores": torch.ones(len(t["boxes"]))} for t in targets]

    monkeypatch.setattr(model, "detect", detect_targets)
    assert TASK.score(model, [DetectionBatch(images, targets)], progress=False)["map"] == pytest.approx(1.0)
    monkeypatch.setattr(model, "detect", lambda inputs, sizes: detect_targets(inputs, sizes, shift=8.0))
    assert TASK.score(model, [DetectionBatch(images, targets)], progress=False)["map"] < 0.9
