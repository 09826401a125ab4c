"""Shared checks for the torchvision detector families: float equality and the full qz contract."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import qz_core
from qz_core.tools.support import SupportResult, probe_model
from qz_core.tools.testing import assert_support_contract

os.environ.setdefault("YOLO_OFFLINE", "1")

# Small inputs keep the default run short; torchvision's transforms resize to these bounds.
SMALL = {"min_size": 128, "max_size": 160}


@torch.no_grad()
def freeze_batchnorm(model: nn.Module, seed: int = 0) -> int:
    """Swaps every BatchNorm2d of the backbone body for a FrozenBatchNorm2d with random statistics.

    This is the model torchvision builds when given weights; the tests cannot download them.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for module in list(model.backbone.body.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                n = child.num_features
                frozen.weight.copy_(1 + 0.1 * torch.randn(n, generator=generator))
                frozen.bias.copy_(0.1 * torch.randn(n, generator=generator))
                frozen.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                frozen.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                setattr(module, name, frozen)
                count += 1
    return count


def torchvision_reference(name: str, frozen: bool = False, **kwargs) -> nn.Module:
    """torchvision's float detector with random weights (and FrozenBatchNorm2d when ``frozen``)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()
    if frozen:
        assert freeze_batchnorm(model) > 0
    return model


@torch.no_grad()
def assert_matches_torchvision(
    name: str, tmp_path, frozen: bool = False, score_thresh: float = 0.0, small: bool = True, **kwargs
) -> None:
    """Unconverted, qz's ``name`` loaded from torchvision's checkpoint gives torchvision's boxes, scores, labels.

    ``small``: R-CNN-style transforms take ``min_size``/``max_size``; SSDs resize to their fixed size.
    """
    kwargs = {**SMALL, **kwargs} if small else kwargs
    reference = torchvision_reference(name, frozen, **kwargs)
    if hasattr(reference, "score_thresh"):
        reference.score_thresh = score_thresh
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = qz_core.get_model(name, weights=str(path), **kwargs).eval()
    if hasattr(model, "score_thresh"):
        model.score_thresh = score_thresh
    assert sum(type(m) is FrozenBatchNorm2d for m in model.modules()) == sum(
        type(m) is FrozenBatchNorm2d for m in reference.modules()
    )
    images = [torch.rand(3, 150, 170), torch.rand(3, 140, 120)]
    got, expected = model(images), reference(images)
    assert any(len(e["boxes"]) for e in expected), "the comparison needs some detections"
    for g, e in zip(got, expected, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], e[key]), key
    dense_ours = model.head_outputs(torch.stack([images[0]]))
    assert all(torch.isfinite(t).all() for t in dense_ours.values())


def assert_fully_supported(
    name: str, tmp_path, slack: float = 1.5, small: bool = True, size: tuple[int, int] = (150, 170), **build_kwargs
) -> SupportResult:
    """PTQ (x86, qnnpack), QAT with targets, FP32 and INT8 ONNX of the dense network, all agreeing.

    Random-weight detectors compound INT8 error over 50+ layers: the INT8 head outputs must stay
    within half their range of FP32, and onnxruntime's INT8 within ``slack`` of PyTorch's own error.
    """
    build_kwargs = {**(SMALL if small else {}), "activation_observer": "minmax", **build_kwargs}
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    # Through the core's probe_model, as `qz support` runs it: the detection task's hooks do the rest.
    result = probe_model(name, example_input=x, work_dir=tmp_path, build_kwargs=build_kwargs)
    assert 0 < result.int8_max_diff < 0.5 * result.output_range, result
    return assert_support_contract(result, slack=slack, float_islands=None)


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
