"""Detection-aware versions of qz_core's probe and QAT loop (detectors take targets and return loss dicts).

``qz_core.support.probe_model`` compares whole outputs and trains on ``sum(output.mean())``; a
torchvision detector returns a variable number of boxes in eval and needs targets in train mode. Here
the comparison is on the raw head outputs (what the INT8 network computes, before decoding and NMS),
ONNX exports that dense network (``DenseDetector``), and QAT steps on the detector's own loss dict.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qz_core import QzError, calibrate, convert, count_float_islands, export_onnx, get_model_entry, run_onnx
from qz_core.backend import set_backend, supported_backends
from qz_core.support import DEFAULT_ENGINES, SupportResult, _step, estimate_bn_stats
from qz_core.workflow import is_prepared

Targets = list[dict[str, Tensor]]


class DenseDetector(nn.Module):
    """The network part of a detector for ONNX: images in, raw head outputs (a tuple of tensors) out.

    Anchors, box decoding and NMS stay with the caller, in float, as in most INT8 deployments.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.detector.head_outputs(images).values())


def random_targets(images: Tensor, num_classes: int = 91, boxes_per_image: int = 2, seed: int = 0) -> Targets:
    """Valid random boxes and labels for a batch of images (for QAT steps on random data)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    targets = []
    for _ in range(len(images)):
        xy = torch.rand(boxes_per_image, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        wh = (0.2 + 0.3 * torch.rand(boxes_per_image, 2, generator=generator)) * torch.tensor([w, h])
        labels = torch.randint(1, num_classes, (boxes_per_image,), generator=generator)
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=torch.tensor([w, h]))], 1), "labels": labels})
    return targets


def detection_loss(losses: dict[str, Tensor]) -> Tensor:
    """torchvision's training objective: the sum of the detector's loss dict."""
    if not isinstance(losses, dict) or not losses:
        raise QzError("A detector in train mode must return its loss dict: call it with (images, targets).")
    return sum(losses.values())


def train_qat_detection(
    model: nn.Module,
    data: Iterable[tuple[Any, Targets]],
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    optimizer: torch.optim.Optimizer | None = None,
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    progress: bool = True,
) -> list[float]:
    """``qz_core.train_qat`` for detectors: batches are (images, targets), the loss ``sum(model(images, targets))``.

    Returns:
        The mean loss of each epoch.
    """
    if not is_prepared(model):
        raise QzError("train_qat_detection() needs a model built with quantize=True, is_qat=True.")
    if epochs < 1:
        raise QzError(f"epochs must be at least 1; got {epochs}.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.SGD(params, lr=lr, momentum=0.9)
    history = []
    for epoch in tqdm(range(epochs), desc="QAT", unit="epoch", disable=not progress):
        model.train()
        if freeze_observers_after is not None and epoch >= freeze_observers_after:
            model.apply(torch.ao.quantization.disable_observer)
        if freeze_bn_after is not None and epoch >= freeze_bn_after:
            model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        losses = []
        for images, targets in tqdm(data, desc=f"epoch {epoch + 1}", leave=False, disable=not progress):
            optimizer.zero_grad()
            loss = detection_loss(model(list(images), targets))
            if not math.isfinite(loss.item()):
                raise QzError(f"QAT loss is {loss.item()}: lower lr (now {lr}) or check the targets.")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not losses:
            raise QzError("QAT saw no batches: the training data is empty.")
        history.append(sum(losses) / len(losses))
    model.eval()
    return history


@torch.no_grad()
def randomize_for_probe(model: nn.Module, batches: Sequence[Tensor], seed: int = 0) -> None:
    """Gives a random-weight detector activations of order one, so INT8 errors mean something.

    torchvision initializes head convs with std 0.01 (outputs are nearly their bias) and random
    BatchNorm statistics blow activations up; re-initialize convs He-style and re-estimate the
    backbone's BatchNorm statistics on ``batches`` (already transformed images).
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(1.0 / fan_in))
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    estimate_bn_stats(model.backbone, batches)


def _transformed(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return model.transform(list(x))[0].tensors


def _max_diff(a: Iterable[Any], b: Iterable[Any]) -> float:
    return float(
        max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max() for x, y in zip(a, b, strict=True))
    )


def probe_detector(
    name: str,
    *,
    example_input: Tensor,
    work_dir: str | Path,
    engines: Sequence[str] = DEFAULT_ENGINES,
    calib_batches: int = 2,
    onnx: bool = True,
    opset: int = 13,
    build_kwargs: dict[str, Any] | None = None,
    prepare_reference: Callable[[nn.Module], None] | None = None,
) -> SupportResult:
    """``qz_core.support.probe_model`` for detectors: compares raw head outputs, QAT on the loss dict.

    ``int8_max_diff`` / ``output_range`` are over the dense head outputs; ONNX exports ``DenseDetector``.

    Args:
        prepare_reference: called on the float model before its checkpoint is written (e.g. to
            swap in FrozenBatchNorm2d).
    """
    entry = get_model_entry(name)
    result = SupportResult(name, entry.task, opset=opset)
    kwargs = dict(build_kwargs or {})
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    x = example_input
    batches = [torch.rand(x.shape, generator=generator) for _ in range(max(calib_batches, 2))]

    float_model = _step(result, "build", lambda: entry.builder(**kwargs))
    if float_model is None:
        return result
    bn_batch = torch.cat([_transformed(float_model, torch.cat([b, b.flip(-1)])) for b in batches])
    randomize_for_probe(float_model, [bn_batch])
    if prepare_reference is not None:
        prepare_reference(float_model)
    checkpoint = work / f"{name}_fp32.pth"
    torch.save(float_model.state_dict(), checkpoint)
    float_model.eval()
    with torch.no_grad():
        reference = [t.numpy() for t in DenseDetector(float_model)(x)]
        float_model(list(x))  # the whole detector (decoding, NMS) runs too
    if onnx:
        report = _step(result, "fp32_onnx", lambda m=float_model: export_onnx(DenseDetector(m), work / "fp32.onnx", x))
        result.fp32_onnx = report is not None
        if report is not None and report.max_abs_diff > 1e-3 * max(1.0, report.output_range):
            result.errors["fp32_onnx"] = f"onnxruntime differs from PyTorch by {report.max_abs_diff}"
    del float_model

    available = [e for e in engines if e in supported_backends()]
    for i, engine in enumerate(available):

        def ptq(engine: str = engine) -> nn.Module:
            model = entry.builder(weights=str(checkpoint), quantize=True, backend=engine, **kwargs)
            calibrate(model, batches[:calib_batches], progress=False)
            return convert(model)

        int8 = _step(result, f"ptq[{engine}]", ptq)
        if int8 is None:
            result.engines[engine] = False
            continue
        set_backend(engine)
        with torch.no_grad():
            out = _step(result, f"forward[{engine}]", lambda m=int8: [t.numpy() for t in DenseDetector(m)(x)])
            _step(result, f"detect[{engine}]", lambda m=int8: m(list(x)))
        result.engines[engine] = out is not None and f"detect[{engine}]" not in result.errors
        if i == 0 and out is not None:
            result.ptq = True
            result.float_islands = count_float_islands(int8)
            result.int8_max_diff = _max_diff(out, reference)
            result.output_range = float(max(np.ptp(r) for r in reference))
            if onnx:
                path = work / "int8.onnx"
                report = _step(
                    result, "int8_onnx", lambda m=int8, p=path: export_onnx(DenseDetector(m), p, x, opset=opset)
                )
                result.int8_onnx = report is not None
                if report is not None:
                    result.onnx_max_diff = report.max_abs_diff
                    result.onnx_fp32_diff = _max_diff(run_onnx(path, x), reference)
        del int8
        gc.collect()

    def qat() -> None:
        model = entry.builder(weights=str(checkpoint), quantize=True, is_qat=True, backend=available[0], **kwargs)
        images = torch.cat(batches[:2])  # BatchNorm trains on 1x1 maps (SSDLite's last block): two images
        data = [(images, random_targets(images, num_classes=model_num_classes(model)))]
        losses = train_qat_detection(model, data, lr=1e-5, progress=False)
        if not all(math.isfinite(v) for v in losses):
            raise QzError(f"QAT losses are not finite: {losses}")
        int8 = convert(model)
        with torch.no_grad():
            int8(list(x))

    result.qat = bool(available) and _step(result, "qat", qat) is None and "qat" not in result.errors
    gc.collect()
    return result


def model_num_classes(model: nn.Module) -> int:
    """The number of classes (background included) a torchvision detector predicts."""
    recipe = getattr(model, "qz_recipe", {})
    return int(recipe.get("model_kwargs", {}).get("num_classes") or 91)
