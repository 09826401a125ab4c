"""A tiny quantizable model registered under a test-only name, for exercising qz-core alone."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

import qz_core
from qz_core import ModelSpec, Task, define_model, fuse_modules, fuse_sequentials, image_dataset, register_task

os.environ.setdefault("YOLO_OFFLINE", "1")
TINY = "qz_test_tinynet"


class Block(nn.Module):
    """conv-bn, residual add, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)) + x)


class QuantizableBlock(Block):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.add.add(self.bn(self.conv(x)), x))


class TinyNet(nn.Module):
    """Stem (conv-bn-relu), one residual block, pooling, a classifier."""

    def __init__(self, num_classes: int = 4, block: type[Block] = Block) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


class QuantizableTinyNet(TinyNet):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(block=QuantizableBlock, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(super().forward(self.quant(x)))

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        fuse_modules(self, [["block.conv", "block.bn"]], is_qat)
        if level == "all":
            fuse_sequentials(self, is_qat)


class ToyClassificationTask(Task):
    """A minimal classification task for qz-core's own tests (qz-classification is not installed here)."""

    name = "qz_test_task"
    metric = "top-1"
    calibration_layouts = "a flat image folder or one subfolder per class"
    training_layouts = "one subfolder per class"
    score_key = "top1"

    def default_transform(self, spec: ModelSpec):
        from torchvision.transforms._presets import ImageClassification

        return ImageClassification(crop_size=spec.input_size[0], resize_size=spec.input_size[0] + 4)

    def calibration_data(self, spec, folder, transform):
        return image_dataset(folder, transform, purpose="calibration")

    def training_data(self, spec, folder, transform):
        return image_dataset(folder, transform, purpose="training", labeled=True)

    def training_loss(self, model, batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets)

    def example_training_batch(self, spec, batch_size=2):
        return torch.rand(batch_size, 3, *spec.input_size), torch.zeros(batch_size, dtype=torch.long)

    @torch.no_grad()
    def score(self, model, batches, *, progress=True):
        model.eval()
        hits = losses = total = 0
        for inputs, targets in batches:
            logits = model(inputs)
            hits += int((logits.argmax(1) == targets).sum())
            losses += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            total += len(targets)
        return {"top1": 100.0 * hits / total, "loss": losses / total}

    def predict(self, model, images, transform):
        with torch.no_grad():
            logits = model(torch.stack([transform(image) for image in images]))
        return [row.softmax(0).topk(min(5, len(row))) for row in logits]

    def draw(self, image, prediction, class_names, title):
        return image

    def add_eval_command(self, parser):
        parser.set_defaults(func=lambda args: 0)


TOY_TASK = register_task(ToyClassificationTask())

if TINY not in qz_core.registry._MODELS:
    qz_test_tinynet = define_model(
        ModelSpec(name=TINY, task=TOY_TASK.name, family="tiny", make_model=QuantizableTinyNet, input_size=(32, 32))
    )


def random_batches(n: int = 3, size: int = 32, batch: int = 4, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator) for _ in range(n)]


@pytest.fixture
def checkpoint(tmp_path):
    """A float TinyNet checkpoint with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = TinyNet()
    qz_core.estimate_bn_stats(model, random_batches())
    path = tmp_path / "tiny.pth"
    torch.save(model.eval().state_dict(), path)
    return path, model


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
