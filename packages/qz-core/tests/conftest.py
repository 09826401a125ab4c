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
import qz_core.support
from qz_core import build_quantizable, fuse_modules, fuse_sequentials, register_model

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


def _default_transforms():
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(crop_size=32, resize_size=36)


if TINY not in qz_core.registry._REGISTRY:

    @register_model(
        TINY,
        task="classification",
        input_size=(32, 32),
        default_transforms=_default_transforms,
        qat_loss=nn.CrossEntropyLoss,
    )
    def qz_test_tinynet(
        *, weights=None, progress: bool = True, quantize: bool = False, is_qat: bool = False, skip_fuse=False, **kwargs
    ) -> QuantizableTinyNet:
        return build_quantizable(
            QuantizableTinyNet,
            weights=weights,
            weights_enum=None,
            progress=progress,
            quantize=quantize,
            is_qat=is_qat,
            skip_fuse=skip_fuse,
            **kwargs,
        )


def random_batches(n: int = 3, size: int = 32, batch: int = 4, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator) for _ in range(n)]


@pytest.fixture
def checkpoint(tmp_path):
    """A float TinyNet checkpoint with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = TinyNet()
    qz_core.support.estimate_bn_stats(model, random_batches())
    path = tmp_path / "tiny.pth"
    torch.save(model.eval().state_dict(), path)
    return path, model


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
