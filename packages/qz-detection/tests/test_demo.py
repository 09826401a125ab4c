"""The detection demo: digit canvases whose boxes fit the strokes exactly, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from qz_classification.digits_canvas import CanvasConfig, write_digits_canvas

TINY = CanvasConfig(num_train=6, num_val=3, size=64, digit_size=(8, 20), seed=3)


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    return write_digits_canvas(tmp_path_factory.mktemp("canvas") / "data", TINY)


def test_boxes_enclose_exactly_the_stroke_pixels(canvases):
    for folder in canvases.values():
        coco = json.loads((folder / "annotations.json").read_text())
        assert {c["id"]: c["name"] for c in coco["categories"]} == {d + 1: str(d) for d in range(10)}
        for info in coco["images"]:
            mask = np.array(Image.open(folder / "masks" / info["file_name"]))
            covered = np.zeros_like(mask, dtype=bool)
            annotations = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
            assert annotations, "every canvas holds at least one digit"
            for a in annotations:
                x, y, w, h = a["bbox"]
                inside = mask[y : y + h, x : x + w]
                assert set(np.unique(inside)) <= {0, a["category_id"]}
                strokes = inside == a["category_id"]
                # Tight: stroke pixels on every edge of the box.
                assert strokes[0].any() and strokes[-1].any() and strokes[:, 0].any() and strokes[:, -1].any()
                covered[y : y + h, x : x + w] |= strokes
            assert np.array_equal(covered, mask > 0), "every stroke pixel lies in its digit's box"


def test_yolo_labels_are_the_coco_boxes(canvases):
    folder = canvases["train"]
    coco = json.loads((folder / "annotations.json").read_text())
    for info in coco["images"]:
        rows = np.loadtxt(folder / "labels" / f"{info['file_name'][:-4]}.txt", ndmin=2)
        boxes = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        size = TINY.size
        expected = [
            [a["category_id"] - 1, (x + w / 2) / size, (y + h / 2) / size, w / size, h / size]
            for a in boxes
            for x, y, w, h in [a["bbox"]]
        ]
        np.testing.assert_allclose(rows, expected, atol=1e-6)


def test_the_generator_is_deterministic_and_writes_whole_folders(canvases, tmp_path):
    again = write_digits_canvas(tmp_path / "data", TINY)
    for name, folder in canvases.items():
        assert (folder / "annotations.json").read_bytes() == (again[name] / "annotations.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temp folder left behind


def test_demo_options():
    from qz_detection.demo import DEMO, add_demo_arguments

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--epochs", "2", "--image-size", "96"])
    assert (args.epochs, args.qat_epochs, args.image_size, args.num_train) == (2, DEMO.qat_epochs, 96, DEMO.num_train)
    assert callable(args.func) and args.out_dir == "qz-out/demo-detection"
    assert DEMO.model == "yolov5nu"
    assert all(action.help for action in parser._actions)


def test_tiny_demo_end_to_end(tmp_path, capsys):
    from qz_detection.demo import run_demo

    result = run_demo(epochs=1, qat_epochs=1, num_train=8, image_size=64, out_dir=tmp_path, progress=False)
    assert [r.precision for r in result.rows] == ["FP32", "INT8 PTQ", "INT8 QAT"]
    fp32, ptq, qat = result.rows
    assert all(0.0 <= r.metric <= 1.0 and r.latency_ms > 0 for r in result.rows)
    assert ptq.size_mb < 0.4 * fp32.size_mb and qat.size_mb < 0.4 * fp32.size_mb
    assert result.checkpoint.is_file() and result.ptq.is_file() and result.qat.is_file()
    assert len(result.predictions) == 4 and all(p.is_file() and p.suffix == ".png" for p in result.predictions)
    with Image.open(result.predictions[0]) as picture:
        assert picture.width >= 2 * 64  # FP32 and INT8 side by side
    out = capsys.readouterr().out
    assert "box mAP" in out and "INT8 QAT" in out and "drop vs FP32" in out
    assert "yolov5nu_64px: box mAP" in out  # the title names the model


def test_image_size_off_the_stride_is_refused_before_any_work(tmp_path):
    from qz_core import QzError
    from qz_detection.demo import run_demo

    with pytest.raises(QzError, match="--image-size must be a multiple of yolov5nu's stride 32; got 100"):
        run_demo(image_size=100, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
