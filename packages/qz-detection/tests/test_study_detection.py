"""``qz study``, ``qz sensitivity`` and ``qz quantize --max-drop`` on detectors, scored by COCO box mAP.

The data are canvases of scikit-learn's real digits (COCO and YOLO layouts); the detectors have random
weights, so these tests check that every command runs a detector through the task's own score, not accuracy.
"""

from __future__ import annotations

import csv

import pytest

import qz_core
from qz_classification.digits_canvas import CanvasConfig, write_digits_canvas
from qz_core.cli import main
from qz_core.tools.study.axes import default_sweeps

SSDLITE = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection_study")
    config = CanvasConfig(num_train=6, num_val=4, size=64, digit_size=(10, 24), seed=0)
    return write_digits_canvas(root, config)


def _rows(path):
    with open(path) as file:
        return {row["label"]: row for row in csv.DictReader(file)}


def _inputs(canvases, model, num_classes):
    argv = [model, "--num-classes", str(num_classes), "--data", str(canvases["val"])]
    return argv + ["--calib", str(canvases["train"]), "--batch-size", "2", "--no-progress"]


def test_relu6_sweep_is_a_default_only_where_the_model_has_relu6():
    assert "relu6" in default_sweeps(qz_core.get_model(SSDLITE, num_classes=11))
    assert "relu6" not in default_sweeps(qz_core.get_model("yolov5nu", num_classes=10))


def test_study_scores_a_detector_by_box_map(canvases, tmp_path, capsys):
    out, axes = tmp_path / "study", tmp_path / "axes.json"
    axes.write_text('{"relu6": ["exact", "relu"]}')
    argv = ["study", *_inputs(canvases, SSDLITE, 11), "--axes", str(axes), "--out", str(out), "--rounds", "2"]
    assert main(argv) == 0
    assert "2 rows (2 computed" in capsys.readouterr().out
    rows = _rows(out / "relu6.csv")
    assert set(rows) == {"FP32", "exact", "relu"}
    assert rows["exact"]["relu6"] == "exact" and rows["relu"]["relu6"] == "relu"
    for row in rows.values():
        assert 0.0 <= float(row["map"]) <= 100.0 and 0.0 <= float(row["map50"]) <= 100.0
        assert float(row["latency_ms"]) > 0
    assert float(rows["exact"]["size_mb"]) < 0.4 * float(rows["FP32"]["size_mb"])
    assert "| exact |" in (out / "relu6.md").read_text()


def test_sensitivity_ranks_a_detectors_layers(canvases, tmp_path, capsys):
    argv = ["sensitivity", *_inputs(canvases, "yolov5nu", 10), "--input-size", "64", "--calib-batches", "1"]
    assert main([*argv, "--no-latency", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "sensitivity.csv") as file:
        layers = list(csv.DictReader(file))
    names = [row["layer"] for row in layers]
    assert len(names) > 50 and len(set(names)) == len(names)  # every conv of yolov5nu, once
    sqnr = [float(row["sqnr_db"]) for row in layers]
    assert all(value > 0 for value in sqnr)  # one INT8 layer keeps the output close to float
    assert "map" in (tmp_path / "sensitivity.md").read_text()


def test_quantize_max_drop_on_a_detector(canvases, tmp_path, capsys):
    argv = ["quantize", "yolov5nu", "--num-classes", "10", "--calib", str(canvases["train"])]
    argv += ["--out", str(tmp_path / "m.pt"), "--no-progress", "--workers", "0"]
    assert main([*argv, "--max-drop", "0.5", "--val", str(canvases["val"])]) == 0
    text = capsys.readouterr().out
    assert "map" in text
    assert qz_core.load_quantized(tmp_path / "m.pt").qz_recipe.name == "yolov5nu"
