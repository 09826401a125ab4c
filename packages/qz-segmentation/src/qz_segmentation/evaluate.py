"""Segmenters scored FP32 and INT8: semantic ones by mean IoU and pixel accuracy on a Pascal VOC-layout
folder, instance ones (Mask R-CNN) by COCO box and mask mAP on a COCO folder."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from qz_core import QzError, calibrate, convert, get_model_builder, get_model_transforms, recipe_of, set_backend
from qz_core.evaluation import Fp32Int8Result, TimedScores, check_eval_options, resolve_eval_model
from qz_segmentation.losses import IGNORE_INDEX
from qz_segmentation.voc import VOCSegmentationFolder


class ConfusionMatrix:
    """Pixel counts ``matrix[target, predicted]`` over every pixel whose target is not ``ignore_index``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: Tensor, target: Tensor) -> None:
        """Adds a batch of predicted class maps and target masks of the same shape."""
        if predicted.shape != target.shape:
            raise QzError(f"Predictions {tuple(predicted.shape)} and masks {tuple(target.shape)} differ in shape.")
        keep = target != self.ignore_index
        target, predicted = target[keep].long(), predicted[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            bad = sorted({int(v) for v in target[(target < 0) | (target >= self.num_classes)].unique()[:5]})
            raise QzError(
                f"Mask values {bad} are not classes of a {self.num_classes}-class model "
                f"(0..{self.num_classes - 1}, {self.ignore_index} = ignore)."
            )
        index = target * self.num_classes + predicted
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def iou(self) -> Tensor:
        """IoU per class (NaN for a class neither in the masks nor in the predictions)."""
        matrix = self.matrix.double()
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))

    def scores(self) -> dict[str, float]:
        """``miou`` (mean over classes that occur, percent) and ``pixel_acc`` (percent)."""
        total = int(self.matrix.sum())
        if total == 0:
            raise QzError("Evaluation counted no pixels: every mask pixel is ignored, or the data is empty.")
        return {
            "miou": 100.0 * float(self.iou().nanmean()),
            "pixel_acc": 100.0 * float(self.matrix.diag().sum()) / total,
        }


def logits_of(output: Any) -> Tensor:
    """The per-pixel logits of a segmenter's output: ``output["out"]``, or the tensor itself."""
    if isinstance(output, dict):
        if "out" not in output:
            raise QzError(f"The model output has no 'out' entry (it has {sorted(output)}).")
        output = output["out"]
    if not isinstance(output, Tensor) or output.dim() != 4:
        raise QzError("A segmenter must return (batch, classes, height, width) logits, or a dict with 'out'.")
    return output


@torch.inference_mode()
def confusion_matrix(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    desc: str = "evaluate",
    progress: bool = True,
) -> ConfusionMatrix:
    """Runs ``model`` over (images, masks) batches and counts its per-pixel argmax against the masks."""
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    for images, masks in tqdm(data, desc=desc, unit="image", disable=not progress):
        matrix.update(logits_of(model(images)).argmax(1), masks)
    return matrix


@torch.inference_mode()
def segmentation_scores(
    model: nn.Module, data: Iterable[tuple[Tensor, Tensor]], *, desc: str = "score", progress: bool = True
) -> dict[str, float]:
    """``miou`` and ``pixel_acc`` (percent) and ``loss`` (per-pixel cross-entropy, 255 ignored) over batches."""
    model.eval()
    matrix, loss_sum, pixels = None, 0.0, 0
    for images, masks in tqdm(data, desc=desc, unit="batch", disable=not progress):
        logits = logits_of(model(images)).float()
        matrix = matrix or ConfusionMatrix(logits.shape[1])
        matrix.update(logits.argmax(1), masks)
        loss_sum += float(nn.functional.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum"))
        pixels += int((masks != IGNORE_INDEX).sum())
    if matrix is None:
        raise QzError("Scoring saw no images: the data is empty.")
    return matrix.scores() | {"loss": loss_sum / max(pixels, 1)}


@dataclass
class SegmentationScores(TimedScores):
    """mIoU and pixel accuracy (percent) of one model, with per-class IoU and the time it took."""

    miou: float
    pixel_acc: float
    images: int
    seconds: float
    class_iou: list[float | None] = field(default_factory=list)


@dataclass
class SegmentationEval(Fp32Int8Result):
    """FP32 and INT8 scores of one segmenter on one split of a VOC-layout folder."""

    METRICS = ("miou", "pixel_acc")

    model: str
    weights: str | None
    data: str
    split: str
    images: int
    num_classes: int
    fp32: SegmentationScores | None = None
    int8: SegmentationScores | None = None
    int8_source: str | None = None
    backend: str | None = None
    calibration: str | None = None

    COLUMNS = (("mIoU", "miou", ".2f"), ("pixel acc", "pixel_acc", ".2f"))
    DELTAS = (("mIoU delta", "miou", ".2f"), ("acc delta", "pixel_acc", ".2f"))

    def heading(self) -> list[str]:
        """What was evaluated, on what."""
        return [
            f"{self.model} ({self.weights or 'random weights'}) on {self.data}, split {self.split!r}",
            f"{self.images} images, {self.num_classes} classes, pixels marked {IGNORE_INDEX} ignored",
        ]


def _timed_scores(
    model: nn.Module, loader: DataLoader, num_classes: int, desc: str, progress: bool
) -> SegmentationScores:
    start = time.perf_counter()
    matrix = confusion_matrix(model, loader, num_classes, desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    scores = matrix.scores()
    class_iou = [None if v != v else 100.0 * v for v in matrix.iou().tolist()]
    return SegmentationScores(scores["miou"], scores["pixel_acc"], len(loader.dataset), seconds, class_iou)


@torch.inference_mode()
def _output_classes(model: nn.Module, image: Tensor) -> int:
    return logits_of(model.eval()(image.unsqueeze(0))).shape[1]


def evaluate_segmenter(
    model: str | None = None,
    *,
    data: str | os.PathLike,
    split: str = "val",
    weights: Any = None,
    quantize: str | None = None,
    int8: str | os.PathLike | None = None,
    calib_split: str | None = None,
    calib_batches: int = 16,
    backend: str | None = None,
    activation_observer: str | None = None,
    limit: int | None = None,
    num_classes: int | None = None,
    aux_loss: bool | None = None,
    workers: int = 0,
    progress: bool = True,
    seed: int = 0,
) -> SegmentationEval:
    """mIoU and pixel accuracy of a segmenter on a Pascal VOC-layout folder, in FP32 and INT8.

    Images go one at a time (VOC images differ in size) through the weights' transforms; masks are
    resized to match with nearest-neighbour interpolation.

    Args:
        model: registered model name; optional with ``int8`` (its file names the model).
        data: the folder with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/ (or VOC2012/ in it).
        split: the ImageSets/Segmentation/<split>.txt list to evaluate.
        weights: enum name (``"DEFAULT"``) or float checkpoint; its transforms preprocess the images.
        quantize: ``"ptq"`` to also quantize the float model and evaluate it.
        int8: an INT8 model file written by ``qz_core.save_quantized`` to evaluate as the INT8 row.
        calib_split: split whose images calibrate PTQ; without it ``calib_batches`` images of
            ``split`` are held out (and left out of both evaluations).
        calib_batches: number of calibration images.
        backend, activation_observer: PTQ engine and activation observer (the engine's defaults).
        limit: evaluate on this many images (a seeded sample).
        num_classes, aux_loss: builder arguments for a checkpoint with its own head.
        progress: show tqdm bars.

    Raises:
        QzError: bad names, folders, splits, files, or masks that do not fit the model.
    """
    check_eval_options(quantize, int8, calib_batches=calib_batches, limit=limit)
    model, _, int8_model = resolve_eval_model(model, int8, "segmentation", "evaluate_segmenter()")
    builder = get_model_builder(model)

    transform = get_model_transforms(model, weights)
    model_kwargs = {k: v for k, v in (("num_classes", num_classes), ("aux_loss", aux_loss)) if v is not None}
    dataset = VOCSegmentationFolder(data, split, transform)
    float_model = None
    if int8_model is None or weights is not None:
        float_model = builder(weights=weights, **model_kwargs).eval()
    classes = _output_classes(float_model if float_model is not None else int8_model, dataset[0][0])

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    calib_data = None
    if quantize:
        if calib_split is not None:
            calib_data = VOCSegmentationFolder(data, calib_split, transform)
            calibration = f"split {calib_split!r}"
        else:
            if len(dataset) < 2:
                raise QzError(f"Split {split!r} has 1 image: too few to hold out calibration images.")
            hold_out = min(calib_batches, len(dataset) // 5) or 1
            calib_data, order = Subset(dataset, sorted(order[:hold_out])), order[hold_out:]
            calibration = f"{hold_out} of the {len(dataset)} images of split {split!r}, held out (not evaluated)"
    evaluated = Subset(dataset, sorted(order[:limit] if limit is not None else order))
    loader = DataLoader(evaluated, batch_size=1, num_workers=workers)
    result = SegmentationEval(
        model=model,
        weights=None if weights is None else str(weights),
        data=str(dataset.root),
        split=split,
        images=len(evaluated),
        num_classes=classes,
    )
    if float_model is not None:
        result.fp32 = _timed_scores(float_model, loader, classes, "FP32", progress)
    if quantize:
        options = {"backend": backend, "activation_observer": activation_observer}
        prepared = builder(weights=weights, quantize=True, **options, **model_kwargs)
        calib_loader = DataLoader(
            calib_data, batch_size=1, num_workers=workers, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        seen = calibrate(prepared, calib_loader, num_batches=calib_batches, progress=progress)
        result.calibration = f"{calibration}, {seen} images fed"
        int8_model = convert(prepared, inplace=True)
        result.int8_source = "PTQ"
    elif int8_model is not None:
        result.int8_source = os.fspath(int8)
    if int8_model is not None:
        result.backend = set_backend(recipe_of(int8_model).options.backend)
        result.int8 = _timed_scores(int8_model, loader, classes, "INT8", progress)
    return result


# --- Instance segmenters (Mask R-CNN): COCO box and mask mAP ------------------------------------

COCO_SPLIT = "val2017"


def names_instance_model(model: str | None, int8: str | os.PathLike | None) -> bool:
    """True when the model to evaluate (by name, else the one an INT8 file names) is an instance segmenter."""
    from qz_core import get_model_spec
    from qz_segmentation.instances import is_instance_spec

    if model is None and int8 is not None:
        try:
            model = torch.load(int8, map_location="cpu", weights_only=True, mmap=True)["recipe"]["name"]
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the evaluator that loads it
            return False
    return model is not None and is_instance_spec(get_model_spec(model))


@dataclass
class InstanceScores(TimedScores):
    """COCO box and mask metrics (in [0, 1]) of one model, with its detection count and the time it took."""

    box_map: float
    box_map50: float
    mask_map: float
    mask_map50: float
    detections: int
    images: int
    seconds: float


@dataclass
class InstanceEval(Fp32Int8Result):
    """FP32 and INT8 COCO box and mask scores of one instance segmenter on one annotated image folder."""

    METRICS = ("box_map", "box_map50", "mask_map", "mask_map50")

    model: str
    weights: str | None
    images_dir: str
    annotations: str
    images: int
    label_map: str
    fp32: InstanceScores | None = None
    int8: InstanceScores | None = None
    int8_source: str | None = None
    backend: str | None = None
    calibration: str | None = None

    COLUMNS = (
        ("box mAP", "box_map", ".3f"),
        ("mask mAP", "mask_map", ".3f"),
        ("mask mAP50", "mask_map50", ".3f"),
        ("dets", "detections", "d"),
    )
    DELTAS = (("box delta", "box_map", ".3f"), ("mask delta", "mask_map", ".3f"))

    def heading(self) -> list[str]:
        """What was evaluated, on what."""
        return [
            f"{self.model} ({self.weights or 'random weights'}) on {self.images_dir}",
            f"{self.images} images, annotations {self.annotations}, labels mapped: {self.label_map}",
        ]


@torch.inference_mode()
def segment_coco(
    model: nn.Module, data: Iterable[tuple[Tensor, int]], category_map: Any, *, desc: str, progress: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO box and mask result records of an instance segmenter over (image, image id) pairs."""
    from qz_segmentation.instances import instance_results, is_instance_model

    if not is_instance_model(model):
        raise QzError(f"{type(model).__name__} is not an instance segmenter (see qz_segmentation.instances).")
    model.eval()
    boxes: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    for image, image_id in tqdm(data, desc=desc, unit="image", disable=not progress):
        prediction = model.segment_instances([image], [tuple(image.shape[-2:])])[0]
        image_boxes, image_segments = instance_results(image_id, prediction, category_map)
        boxes += image_boxes
        segments += image_segments
    return boxes, segments


def _first(batch: list[Any]) -> Any:
    return batch[0]


def _instance_scores(
    model: nn.Module, evaluated: Subset, category_map: Any, desc: str, workers: int, progress: bool
) -> InstanceScores:
    from qz_segmentation.instances import instance_scores

    start = time.perf_counter()
    loader = DataLoader(evaluated, batch_size=1, collate_fn=_first, num_workers=workers)
    boxes, segments = segment_coco(model, loader, category_map, desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    dataset = evaluated.dataset
    scores = instance_scores(dataset.coco, boxes, segments, [dataset.ids[i] for i in evaluated.indices])
    return InstanceScores(**scores, detections=len(boxes), images=len(evaluated), seconds=seconds)


def evaluate_instance_segmenter(
    model: str | None = None,
    *,
    data: str | os.PathLike,
    split: str = COCO_SPLIT,
    annotations: str | os.PathLike | None = None,
    weights: Any = None,
    quantize: str | None = None,
    int8: str | os.PathLike | None = None,
    calib_images: str | os.PathLike | None = None,
    calib_batches: int = 16,
    backend: str | None = None,
    activation_observer: str | None = None,
    limit: int | None = None,
    num_classes: int | None = None,
    label_map: str = "category_id",
    model_kwargs: dict[str, Any] | None = None,
    workers: int = 0,
    progress: bool = True,
    seed: int = 0,
) -> InstanceEval:
    """COCO box and mask (segm) mAP of an instance segmenter (Mask R-CNN) on a COCO folder, in FP32 and INT8.

    Args:
        model: registered instance-segmentation model; optional with ``int8`` (its file names the model).
        data: a COCO root (``<split>/`` images, ``annotations/instances_<split>.json``), or with
            ``annotations`` the images folder itself. Object masks are polygons or RLE.
        split: the split of a COCO root.
        annotations: a COCO instances JSON file (then ``data`` is its images folder).
        weights: enum name (``"DEFAULT"``) or float checkpoint.
        quantize: ``"ptq"`` to also quantize the float model and evaluate it.
        int8: an INT8 model file written by ``qz_core.save_quantized`` to evaluate as the INT8 row.
        calib_images: a folder of images that calibrates PTQ; without it up to ``calib_batches``
            evaluation images are held out (and left out of both evaluations).
        calib_batches: number of calibration images.
        backend, activation_observer: PTQ engine and activation observer (the engine's defaults).
        limit: evaluate this many images (a seeded sample).
        num_classes: class count of a checkpoint with its own head.
        label_map: ``"category_id"`` (torchvision's COCO labels) or ``"contiguous"`` (``qz_detection.coco.LABEL_MAPS``).
        model_kwargs: further builder arguments (``min_size``, ``box_score_thresh``, ...).
        progress: show tqdm bars.
        seed: seed of the held-out and ``limit`` samples.

    Raises:
        QzError: bad names, folders, annotation files, missing images, or a model that is not an instance segmenter.
    """
    from qz_detection.coco import CategoryMap, CocoImages, find_coco, load_coco
    from qz_detection.detector import num_classes_of
    from qz_detection.evaluate import CocoSplit

    check_eval_options(quantize, int8, calib_batches=calib_batches, limit=limit)
    model, _, int8_model = resolve_eval_model(model, int8, "segmentation", "evaluate_instance_segmenter()")
    builder = get_model_builder(model)
    images_dir, annotation_file = find_coco(data, split, annotations)
    dataset = CocoImages(images_dir, load_coco(annotation_file))
    kwargs = dict(model_kwargs or {}) | ({"num_classes": num_classes} if num_classes is not None else {})
    float_model = None
    if int8_model is None or weights is not None:
        float_model = builder(weights=weights, **kwargs).eval()
    num_labels = num_classes_of(float_model if float_model is not None else int8_model)
    category_map = CategoryMap.for_model(label_map, dataset.coco.getCatIds(), num_labels, first_label=1)

    split_plan = CocoSplit.of(dataset, calib_images if quantize else None, calib_batches, limit, seed, bool(quantize))
    evaluated = split_plan.evaluated
    ids = category_map.category_ids
    result = InstanceEval(
        model=model,
        weights=None if weights is None else str(weights),
        images_dir=str(images_dir),
        annotations=str(annotation_file),
        images=len(evaluated),
        label_map=f"{label_map} ({len(ids)} categories, ids {ids[0]}..{ids[-1]})",
    )
    if float_model is not None:
        result.fp32 = _instance_scores(float_model, evaluated, category_map, "FP32", workers, progress)
    if quantize:
        options = {"backend": backend, "activation_observer": activation_observer}
        prepared = builder(weights=weights, quantize=True, **options, **kwargs)
        int8_model, result.calibration = split_plan.quantize(prepared, lambda image: image[None], progress)
        result.int8_source = "PTQ"
    elif int8_model is not None:
        result.int8_source = os.fspath(int8)
    if int8_model is not None:
        result.backend = set_backend(recipe_of(int8_model).options.backend)
        result.int8 = _instance_scores(int8_model, evaluated, category_map, "INT8", workers, progress)
    return result
