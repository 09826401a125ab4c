"""``qz train-qat`` on real handwritten digits: a float ResNet-18 fine-tuned with QAT through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import qz_core
from qz_classification._common import imagenet_transform
from qz_classification.demo import train_float
from qz_classification.task import TASK
from qz_core.cli import main

IMAGE_SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on shared cores run small convolutions many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_digits_folders(root: Path, train: int = 800, val: int = 300, seed: int = 0) -> dict[str, Path]:
    """Some of scikit-learn's 1,797 real 8x8 digits as RGB PNGs in ``train/DIGIT`` and ``val/DIGIT`` folders."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    splits = dict(
        zip(
            ("train", "val"),
            train_test_split(
                np.arange(len(digits.target)),
                train_size=train,
                test_size=val,
                stratify=digits.target,
                random_state=seed,
            ),
            strict=True,
        )
    )
    for split, indices in splits.items():
        for index in indices:
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            ink = Image.fromarray((digits.images[index] / 16.0 * 255).astype(np.uint8))
            ink.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB").save(folder / f"{index}.png")
    return {split: root / split for split in splits}


def test_train_qat_cli_on_digits_is_far_above_chance(tmp_path, capsys):
    folders = write_digits_folders(tmp_path / "digits")
    spec = qz_core.get_model_spec("resnet18")
    train = TASK.training_data(spec, folders["train"], imagenet_transform(IMAGE_SIZE))
    torch.manual_seed(0)
    model = qz_core.get_model("resnet18", num_classes=10)
    train_float(model, DataLoader(train, batch_size=32, shuffle=True), epochs=1, lr=2e-3)
    torch.save(model.state_dict(), tmp_path / "resnet18_digits.pth")

    out = tmp_path / "qat"
    argv = ["train-qat", "resnet18", "--weights", str(tmp_path / "resnet18_digits.pth"), "--num-classes", "10"]
    argv += ["--train", str(folders["train"]), "--val", str(folders["val"]), "--out", str(out)]
    argv += ["--epochs", "1", "--image-size", str(IMAGE_SIZE), "--lr", "1e-3", "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    assert "epoch 1/1: loss" in capsys.readouterr().out

    history = json.loads((out / "history.json").read_text())
    int8 = qz_core.load_quantized(out / "int8_best.pt")
    val = TASK.training_data(spec, folders["val"], imagenet_transform(IMAGE_SIZE))
    scores = TASK.score(int8, DataLoader(val, batch_size=64), progress=False)
    assert scores["top1"] == pytest.approx(history["epochs"][0]["int8"]["top1"])
    assert scores["top1"] > 60.0, scores  # ten balanced digits: chance is 10%
