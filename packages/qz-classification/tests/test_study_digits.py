"""``qz study`` on the demo's ResNet-18 trained on scikit-learn's digits, read from image folders the task's way."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import qz_core
from qz_classification.demo import train_float
from qz_core.cli import main
from qz_core.tools.study import stage_names

SIZE = 32


def _write_digits(root, per_split):
    """The first ``per_split`` digits of each split, upsampled to SIZE px, one subfolder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = (F.interpolate(images, size=(SIZE, SIZE), mode="bilinear").clamp(0, 1) * 255).to(torch.uint8)
    splits = {"train": range(0, per_split["train"]), "val": range(1000, 1000 + per_split["val"])}
    for split, indices in splits.items():
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i, 0].numpy()).convert("RGB").save(folder / f"{i:04d}.png")
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A ResNet-18 trained briefly (demo's ``train_float``) on 600 digit images read the task's way at 32 px."""
    root = tmp_path_factory.mktemp("digits_study")
    train_dir, val_dir = _write_digits(root, {"train": 600, "val": 200})
    torch.manual_seed(0)
    spec = qz_core.get_model_spec("resnet18").variant(input_size=(SIZE, SIZE), preprocess=None)
    task = qz_core.get_task("classification")
    dataset = task.training_data(spec, train_dir, task.transform(spec, None))
    model = qz_core.get_model("resnet18", num_classes=10)
    train_float(model, DataLoader(dataset, batch_size=32, shuffle=True), epochs=3, lr=3e-3)
    checkpoint = root / "resnet18_digits.pth"
    torch.save(model.state_dict(), checkpoint)
    return checkpoint, train_dir, val_dir


def _csv(path):
    with open(path) as file:
        return {row["label"]: row for row in csv.DictReader(file)}


def test_start_stages_come_from_the_model():
    assert stage_names(qz_core.get_model("resnet18")) == ["layer1", "layer2", "layer3", "layer4"]


def test_study_on_digits(digits_model, tmp_path, capsys):
    checkpoint, train_dir, val_dir = digits_model
    axes = tmp_path / "axes.yaml"
    axes.write_text("fusion: [none, all]\nstart: [all, layer3]\nbase: {calib_fraction: 0.5}\n")
    out = tmp_path / "study"
    argv = ["study", "resnet18", "--weights", str(checkpoint), "--num-classes", "10", "--data", str(val_dir)]
    argv += ["--calib", str(train_dir), "--axes", str(axes), "--out", str(out), "--input-size", str(SIZE)]
    argv += ["--batch-size", "50", "--rounds", "3", "--no-progress"]
    assert main(argv) == 0
    assert "3 rows (3 computed" in capsys.readouterr().out  # fuse=all and start=all are one row

    fusion, start = _csv(out / "fusion.csv"), _csv(out / "start.csv")
    fp32, fused, unfused = fusion["FP32"], fusion["all"], fusion["none"]
    assert float(fp32["top1"]) > 60  # trained: far above chance (10%)
    assert fused["key"] == start["all"]["key"] and fused["calib_batches"] == "6"  # half of 600 images, 50 a batch
    for row in (fused, unfused, start["layer3"]):
        assert float(row["top1"]) > float(fp32["top1"]) - 6  # PTQ of a trained ResNet-18 loses points, not tens
        assert float(row["loss"]) > 0 and float(row["latency_ms"]) > 0 and row["latency_pass"] == "inline"
    assert float(fused["size_mb"]) < 0.3 * float(fp32["size_mb"])
    # Layers 1-2 stay float from layer3 on: the file holds their FP32 weights (~2.7 MB more).
    assert float(fused["size_mb"]) + 1.5 < float(start["layer3"]["size_mb"]) < float(fp32["size_mb"])
    assert start["layer3"]["quantize_from"] == "layer3" and unfused["fuse_level"] == "none"
    table = (out / "start.md").read_text()
    assert "| layer3 |" in table and "| FP32 |" in table
    assert all((out / f"{sweep}.png").stat().st_size > 10_000 for sweep in ("fusion", "start"))

    assert main(argv) == 0
    assert "3 rows (0 computed, 0 timed" in capsys.readouterr().out  # all cached
