"""Top-k accuracy of classifiers, FP32 or INT8, and ImageNet evaluation of a registered model."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from qz_classification.data import calibration_images
from qz_classification.imagenet import check_class_count, imagenet_folder
from qz_classification.task import logits_of
from qz_core import QzError, calibrate, convert, get_model_builder, get_model_transforms, recipe_of, set_backend
from qz_core.evaluation import Fp32Int8Result, TimedScores, check_eval_options, resolve_eval_model


@torch.inference_mode()
def topk_accuracy(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    topk: Sequence[int] = (1, 5),
    *,
    desc: str = "evaluate",
    progress: bool = True,
) -> dict[str, float]:
    """Top-k accuracy in percent over (images, labels) batches, e.g. ``{"top1": 76.1, "top5": 92.9}``."""
    model.eval()
    correct = dict.fromkeys(topk, 0)
    total = 0
    for images, labels in tqdm(data, desc=desc, unit="batch", disable=not progress):
        logits = model(images)
        k_max = min(max(topk), logits.shape[1])
        predicted = logits.topk(k_max, dim=1).indices
        hits = predicted.eq(labels.view(-1, 1))
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        total += labels.numel()
    if total == 0:
        raise QzError("Evaluation saw no images: the data is empty.")
    return {f"top{k}": 100.0 * correct[k] / total for k in topk}


@torch.inference_mode()
def classification_scores(
    model: nn.Module, data: Iterable[tuple[Tensor, Tensor]], *, desc: str = "score", progress: bool = True
) -> dict[str, float]:
    """``top1`` and ``top5`` accuracy (percent) and ``loss`` (mean cross-entropy) over (images, labels) batches."""
    model.eval()
    loss_sum, total, hits = 0.0, 0, {1: 0, 5: 0}
    for images, labels in tqdm(data, desc=desc, unit="batch", disable=not progress):
        logits = logits_of(model(images)).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels.view(-1, 1))
        for k in hits:
            hits[k] += int(ranked[:, :k].any(dim=1).sum())
        total += labels.numel()
    if total == 0:
        raise QzError("Scoring saw no images: the data is empty.")
    return {"top1": 100.0 * hits[1] / total, "top5": 100.0 * hits[5] / total, "loss": loss_sum / total}


@dataclass
class Accuracy(TimedScores):
    """Top-1/top-5 accuracy (percent) of one model, with how long the evaluation took."""

    top1: float
    top5: float
    images: int
    seconds: float


@dataclass
class ClassificationEval(Fp32Int8Result):
    """FP32 and INT8 accuracy of one classifier on one validation folder.

    Attributes:
        model: registered model name.
        weights: the weights evaluated (enum name or checkpoint path), None for random ones.
        data: the folder holding the class folders.
        images: number of images evaluated.
        num_classes: the model's number of outputs.
        labels: what the folder names are ('ImageNet-1k synset ids', 'class indices', ...).
        fp32: float accuracy, None when not evaluated.
        int8: INT8 accuracy, None when not evaluated.
        int8_source: 'PTQ' or the INT8 model file.
        backend: quantized engine of the INT8 model.
        calibration: where the PTQ calibration images came from.
    """

    METRICS = ("top1", "top5")

    model: str
    weights: str | None
    data: str
    images: int
    num_classes: int
    labels: str
    fp32: Accuracy | None = None
    int8: Accuracy | None = None
    int8_source: str | None = None
    backend: str | None = None
    calibration: str | None = None

    COLUMNS = (("top-1", "top1", ".2f"), ("top-5", "top5", ".2f"))
    DELTAS = (("top-1 delta", "top1", ".2f"), ("top-5 delta", "top5", ".2f"))

    def heading(self) -> list[str]:
        """What was evaluated, on what."""
        head = f"{self.model} ({self.weights or 'random weights'}) on {self.data}"
        return [head, f"{self.images} images, labels: {self.labels}, {self.num_classes} model classes"]


def _timed_accuracy(model: nn.Module, data: DataLoader, desc: str, progress: bool) -> Accuracy:
    start = time.perf_counter()
    result = topk_accuracy(model, data, (1, 5), desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    return Accuracy(result["top1"], result["top5"], len(data.dataset), seconds)


@torch.inference_mode()
def _output_classes(model: nn.Module, image: Tensor) -> int:
    # One forward pass: the model's true number of outputs, whatever its head is.
    logits = model.eval()(image.unsqueeze(0))
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise QzError(f"{type(model).__name__} does not return (batch, classes) logits: it is not a classifier.")
    return logits.shape[1]


def _split(size: int, *, hold_out: int, limit: int | None, seed: int) -> tuple[list[int] | None, list[int] | None]:
    # A seeded shuffle, so held-out and limited subsets span all classes (folders come sorted).
    if not hold_out and limit is None:
        return None, None
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    calib, rest = order[:hold_out], order[hold_out:]
    if limit is not None:
        rest = rest[:limit]
    return sorted(calib), sorted(rest)


def evaluate_classifier(
    model: str | None = None,
    *,
    data: str | os.PathLike,
    weights: Any = None,
    quantize: str | None = None,
    int8: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    calib_batches: int = 16,
    backend: str | None = None,
    activation_observer: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    limit: int | None = None,
    class_index: str | os.PathLike | Mapping[str, int] | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> ClassificationEval:
    """Top-1/top-5 of a classifier on an ImageNet-style validation folder, in FP32 and INT8.

    Args:
        model: registered model name; optional with ``int8`` (its file names the model).
        data: class folders named by synset id or class index, in ``data`` or ``data/val``.
        weights: enum name (``"DEFAULT"``) or float checkpoint; its transforms preprocess the images.
        quantize: ``"ptq"`` to also quantize the float model (calibrate on ``calib``) and evaluate it.
        int8: an INT8 model file written by ``qz_core.save_quantized`` to evaluate as the INT8 row.
        calib: calibration image folder; without it ``calib_batches`` batches of ``data`` are held
            out (and left out of both evaluations).
        calib_batches: number of calibration batches.
        backend: quantized engine for PTQ; the platform's by default.
        activation_observer: PTQ activation observer (``qz_core.ACTIVATION_OBSERVERS``); the engine's default
            (histogram) when None.
        batch_size, workers: data loading.
        limit: evaluate on this many images (a seeded sample spanning the classes).
        class_index: folder-name -> index mapping (or file) for label sets other than ImageNet-1k.
        num_classes: class count of a float checkpoint that is not 1000.
        progress: show tqdm bars.
        seed: seed of the held-out and ``limit`` samples.

    Raises:
        QzError: bad names, folders, files, or classes that do not fit the model.
    """
    check_eval_options(quantize, int8, batch_size=batch_size, calib_batches=calib_batches, limit=limit)
    model, _, int8_model = resolve_eval_model(model, int8, "classification", "evaluate_classifier()")
    builder = get_model_builder(model)

    transform = get_model_transforms(model, weights)
    model_kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    float_model = None
    if int8_model is None or weights is not None:
        float_model = builder(weights=weights, **model_kwargs).eval()
    dataset = imagenet_folder(data, transform, class_index=class_index)
    classes = _output_classes(float_model if float_model is not None else int8_model, dataset[0][0])
    check_class_count(dataset.root, dataset.class_to_idx, dataset.label_source, classes)

    hold_out = 0
    if quantize and calib is None:
        if len(dataset) < 2:
            raise QzError(f"{str(dataset.root)!r} has {len(dataset)} image: too few to hold out calibration images.")
        hold_out = min(calib_batches * batch_size, len(dataset) // 5) or 1
    calib_idx, eval_idx = _split(len(dataset), hold_out=hold_out, limit=limit, seed=seed)
    evaluated = dataset if eval_idx is None else Subset(dataset, eval_idx)
    loader = DataLoader(evaluated, batch_size=batch_size, num_workers=workers)
    result = ClassificationEval(
        model=model,
        weights=None if weights is None else str(weights),
        data=str(dataset.root),
        images=len(evaluated),
        num_classes=classes,
        labels=dataset.label_source,
    )
    if float_model is not None:
        result.fp32 = _timed_accuracy(float_model, loader, "FP32", progress)
    if quantize:
        options = {"backend": backend, "activation_observer": activation_observer}
        prepared = builder(weights=weights, quantize=True, **options, **model_kwargs)
        if calib is None:
            calib_data = Subset(dataset, calib_idx)
            result.calibration = (
                f"{len(calib_idx)} of the {len(dataset)} images of {result.data}, held out (not evaluated)"
            )
        else:
            calib_data = calibration_images(calib, transform)
            result.calibration = f"up to {calib_batches} batches of {batch_size} from {os.fspath(calib)}"
        generator = torch.Generator().manual_seed(seed)
        calib_loader = DataLoader(
            calib_data, batch_size=batch_size, num_workers=workers, shuffle=True, generator=generator
        )
        seen = calibrate(prepared, calib_loader, num_batches=calib_batches, progress=progress)
        result.calibration += f", {seen} batches fed"
        int8_model = convert(prepared, inplace=True)
        result.int8_source = "PTQ"
    elif int8_model is not None:
        result.int8_source = os.fspath(int8)
    if int8_model is not None:
        result.backend = set_backend(recipe_of(int8_model).options.backend)
        result.int8 = _timed_accuracy(int8_model, loader, "INT8", progress)
    return result
