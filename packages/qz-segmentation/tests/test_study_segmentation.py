"""``qz study`` and ``qz sensitivity`` on a segmenter, scored by mIoU on canvases of real digits.

The model has random weights: these tests check that the commands run a segmenter through the task's own
score (mIoU, pixel accuracy, loss), not accuracy.
"""

from __future__ import annotations

import csv

import pytest

from qz_classification.digits_canvas import CanvasConfig, write_digits_canvas
from qz_core.cli import main

MODEL = "lraspp_mobilenet_v3_large"


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation_study")
    return write_digits_canvas(root, CanvasConfig(num_train=6, num_val=4, size=64, digit_size=(10, 24), seed=0))


def _inputs(canvases):
    argv = [MODEL, "--num-classes", "11", "--data", str(canvases["val"]), "--calib", str(canvases["train"])]
    return argv + ["--input-size", "64", "--batch-size", "2", "--no-progress"]


def test_study_scores_a_segmenter_by_miou(canvases, tmp_path, capsys):
    out, axes = tmp_path / "study", tmp_path / "axes.yaml"
    axes.write_text("fusion: [none, all]\ncalibration: [50%, 100%]\n")
    assert main(["study", *_inputs(canvases), "--axes", str(axes), "--out", str(out), "--rounds", "2"]) == 0
    assert "3 rows (3 computed" in capsys.readouterr().out  # fuse=all at 100% is in both sweeps
    with open(out / "fusion.csv") as file:
        rows = {row["label"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"FP32", "none", "all"}
    for row in rows.values():
        assert 0.0 <= float(row["miou"]) <= 100.0 and 0.0 <= float(row["pixel_acc"]) <= 100.0
        assert float(row["loss"]) > 0
    assert float(rows["all"]["size_mb"]) < 0.4 * float(rows["FP32"]["size_mb"])
    assert (out / "calibration.md").read_text().count("| 50% |") == 1


def test_sensitivity_ranks_a_segmenters_layers(canvases, tmp_path):
    argv = ["sensitivity", *_inputs(canvases), "--calib-batches", "1", "--no-latency", "--out", str(tmp_path)]
    assert main(argv) == 0
    with open(tmp_path / "sensitivity.csv") as file:
        layers = list(csv.DictReader(file))
    assert len(layers) > 30 and all(float(row["sqnr_db"]) > 0 for row in layers)
    assert "miou" in (tmp_path / "sensitivity.md").read_text()
