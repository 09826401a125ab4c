"""The segmentation demo: digit canvases split by source image, masks that match the boxes, a tiny run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from qz_classification.digits_canvas import CanvasConfig, split_digits, write_digits_canvas

TINY = CanvasConfig(num_train=8, num_val=4, size=64, digit_size=(8, 20), seed=1)


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    return write_digits_canvas(tmp_path_factory.mktemp("canvas") / "data", TINY)


def _sources(folder):
    return {a["source_digit"] for a in json.loads((folder / "annotations.json").read_text())["annotations"]}


def test_no_digit_image_is_in_both_splits(canvases):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    parts = split_digits(targets, 0.25, seed=0)
    assert not set(parts["train"]) & set(parts["val"])
    assert len(parts["train"]) + len(parts["val"]) == len(targets)
    assert set(targets[parts["val"]]) == set(range(10))  # every class in both parts
    train, val = _sources(canvases["train"]), _sources(canvases["val"])
    assert train and val and not train & val
    assert train <= set(parts_for(TINY)["train"]) and val <= set(parts_for(TINY)["val"])


def parts_for(config):
    from sklearn.datasets import load_digits

    return split_digits(load_digits().target, config.val_fraction, config.seed)


def test_masks_match_the_boxes_and_classes(canvases):
    for folder in canvases.values():
        coco = json.loads((folder / "annotations.json").read_text())
        for info in coco["images"]:
            mask = np.array(Image.open(folder / "masks" / info["file_name"]))
            image = Image.open(folder / "images" / info["file_name"])
            assert mask.shape == (image.height, image.width) == (TINY.size, TINY.size) and image.mode == "RGB"
            boxed = np.zeros(mask.shape, dtype=np.uint8)
            for a in (a for a in coco["annotations"] if a["image_id"] == info["id"]):
                x, y, w, h = a["bbox"]
                region = mask[y : y + h, x : x + w]
                boxed[y : y + h, x : x + w][region == a["category_id"]] = a["category_id"]
            # Background 0 and digit d as class d + 1: every mask pixel belongs to one box of its class.
            assert mask.max() <= 10 and np.array_equal(boxed, mask)


def test_demo_options():
    from qz_segmentation.demo import DEMO, add_demo_arguments

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--num-train", "32", "--seed", "5", "--out-dir", "x"])
    assert (args.num_train, args.seed, args.out_dir, args.epochs) == (32, 5, "x", DEMO.epochs)
    assert callable(args.func) and all(action.help for action in parser._actions)


def test_tiny_demo_end_to_end(tmp_path, capsys):
    from qz_segmentation.demo import run_demo

    result = run_demo(epochs=1, qat_epochs=1, num_train=8, image_size=64, out_dir=tmp_path, progress=False)
    assert [r.precision for r in result.rows] == ["FP32", "INT8 PTQ", "INT8 QAT"]
    fp32, ptq, qat = result.rows
    assert all(0.0 <= r.metric <= 1.0 and r.latency_ms > 0 for r in result.rows)
    assert ptq.size_mb < 0.4 * fp32.size_mb and qat.size_mb < 0.4 * fp32.size_mb
    assert result.checkpoint.is_file() and result.ptq.is_file() and result.qat.is_file()
    assert (tmp_path / "data" / "train" / "masks").is_dir()
    assert len(result.predictions) == 4 and all(p.is_file() and p.suffix == ".png" for p in result.predictions)
    out = capsys.readouterr().out
    assert "mIoU" in out and "INT8 PTQ" in out and "drop vs FP32" in out


def test_table_drops_and_ratios_are_against_fp32(monkeypatch):
    import builtins

    from qz_classification.canvas_demo import DemoResult, DemoRow

    rows = [DemoRow("FP32", 0.5, 12.0, 10.0), DemoRow("INT8 PTQ", 0.45, 3.0, 5.0), DemoRow("INT8 QAT", 0.5, 3.0, 4.0)]
    result = DemoResult("segmentation", "m", "mIoU", rows, {}, *[None] * 3, [])
    assert result.ptq_drop == pytest.approx(0.05) and result.qat_drop == 0
    real_import = builtins.__import__

    def no_tabulate(name, *args, **kwargs):
        if name == "tabulate":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tabulate)
    lines = result.table().splitlines()
    assert lines[0].split()[:2] == ["precision", "mIoU"] and "drop vs FP32" in lines[0]
    assert lines[2].split() == ["INT8", "PTQ", "0.4500", "+0.0500", "3.00", "0.25", "5.00", "0.50"]
