"""COCO box mAP of detectors, FP32 or INT8: torchvision detectors and ultralytics YOLO.

The two model kinds differ in one place, their ``DetectionFormat``: how an image in [0, 1] becomes
the model's input and how the output becomes boxes (xyxy, in the original image's pixels), scores
and labels. torchvision detectors take the image as it is (they normalize and resize inside and map
their boxes back); YOLO takes a letterboxed image (long side resized to its input size, padded to a
multiple of its stride) and its boxes go through ultralytics' NMS, then back through the letterbox.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.functional import to_tensor
from tqdm.auto import tqdm

from qz_core import (
    ModelSpec,
    QzError,
    calibrate,
    convert,
    get_model_builder,
    get_model_spec,
    image_dataset,
    recipe_of,
    set_backend,
)
from qz_core.evaluation import Fp32Int8Result, TimedScores, check_eval_options, resolve_eval_model
from qz_detection.coco import (
    CategoryMap,
    CocoImages,
    coco_from_targets,
    coco_results,
    coco_scores,
    find_coco,
    load_coco,
)
from qz_detection.detector import as_detector, num_classes_of
from qz_detection.transforms import LETTERBOX_FILL

Detections = tuple[Tensor, Tensor, Tensor]  # boxes (N, 4) xyxy in image pixels, scores (N,), labels (N,)


def letterbox(image: Tensor, size: int, stride: int = 32) -> tuple[Tensor, tuple[float, float], tuple[int, int]]:
    """Resizes ``image`` (3, H, W) so its long side is ``size`` and pads it to a multiple of ``stride``.

    Returns:
        The batch of one (1, 3, H', W'), the (x, y) scale and the (left, top) padding.
    """
    height, width = image.shape[-2:]
    ratio = size / max(height, width)
    new_h, new_w = max(round(height * ratio), 1), max(round(width * ratio), 1)
    batch = image[None]
    if (new_h, new_w) != (height, width):
        batch = F.interpolate(batch, (new_h, new_w), mode="bilinear", align_corners=False, antialias=ratio < 1)
    out_h, out_w = math.ceil(new_h / stride) * stride, math.ceil(new_w / stride) * stride
    left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
    batch = F.pad(batch, (left, out_w - new_w - left, top, out_h - new_h - top), value=LETTERBOX_FILL)
    return batch, (new_w / width, new_h / height), (left, top)


def unletterbox(boxes: Tensor, scale: tuple[float, float], pad: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Maps xyxy ``boxes`` from a ``letterbox`` output back to the original (H, W) image, clipped to it."""
    boxes = boxes.clone()
    boxes[:, 0::2] = ((boxes[:, 0::2] - pad[0]) / scale[0]).clamp(0, image_size[1])
    boxes[:, 1::2] = ((boxes[:, 1::2] - pad[1]) / scale[1]).clamp(0, image_size[0])
    return boxes


class TorchvisionFormat:
    """torchvision detectors: the image goes in as it is; boxes come back in its pixels."""

    label_map = "category_id"
    first_label = 1  # label 0 is the background

    def inputs(self, image: Tensor, model: nn.Module) -> Tensor:
        return image[None]

    def detect(self, model: nn.Module, image: Tensor) -> Detections:
        output = model([image])
        if not (isinstance(output, list) and output and isinstance(output[0], dict) and "boxes" in output[0]):
            raise QzError(f"{type(model).__name__} does not return torchvision detections (dicts with 'boxes').")
        return output[0]["boxes"], output[0]["scores"], output[0]["labels"]

    def num_labels(self, model: nn.Module, image: Tensor) -> int:
        return num_classes_of(model)


@dataclass
class YoloFormat:
    """ultralytics YOLO: letterboxed input, ultralytics' NMS (its validation settings), boxes mapped back."""

    size: int = 640
    conf_thres: float = 0.001
    iou_thres: float = 0.7
    max_det: int = 300
    label_map = "contiguous"
    first_label = 0

    def inputs(self, image: Tensor, model: nn.Module) -> Tensor:
        return letterbox(image, self.size, _stride(model))[0]

    def predictions(self, model: nn.Module, image: Tensor) -> Tensor:
        output = model(self.inputs(image, model))
        predictions = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(predictions, Tensor) or predictions.dim() != 3 or predictions.shape[1] <= 4:
            raise QzError(f"{type(model).__name__} does not return YOLO predictions (batch, 4 + classes, anchors).")
        return predictions

    def detect(self, model: nn.Module, image: Tensor) -> Detections:
        from qz_detection._ultralytics import import_ultralytics

        non_max_suppression = import_ultralytics("ultralytics.utils.nms").non_max_suppression
        _, scale, pad = letterbox(image, self.size, _stride(model))
        kept = non_max_suppression(
            self.predictions(model, image), self.conf_thres, self.iou_thres, multi_label=True, max_det=self.max_det
        )[0]
        return unletterbox(kept[:, :4], scale, pad, tuple(image.shape[-2:])), kept[:, 4], kept[:, 5].long()

    def num_labels(self, model: nn.Module, image: Tensor) -> int:
        return self.predictions(model, image).shape[1] - 4


def _stride(model: nn.Module) -> int:
    stride = getattr(model, "stride", None)
    return int(stride.max()) if isinstance(stride, Tensor) else 32


def detection_format(spec: ModelSpec, image_size: int | None = None) -> TorchvisionFormat | YoloFormat:
    """The input/output convention of a registered detector (by its family)."""
    if spec.family == "yolo":
        return YoloFormat(image_size or max(spec.input_size))
    if image_size is not None:
        raise QzError(f"image_size applies to YOLO models; {spec.name!r} resizes inside (pass min_size/max_size).")
    return TorchvisionFormat()


@torch.inference_mode()
def detect_coco(
    model: nn.Module,
    data: Iterable[tuple[Tensor, int]],
    fmt: TorchvisionFormat | YoloFormat,
    category_map: CategoryMap,
    *,
    desc: str = "detect",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """COCO result records of ``model`` over (image, image id) pairs."""
    model.eval()
    results: list[dict[str, Any]] = []
    for image, image_id in tqdm(data, desc=desc, unit="image", disable=not progress):
        results += coco_results(image_id, *fmt.detect(model, image), category_map)
    return results


def _label_key(model: nn.Module) -> str:
    """The target key a detector's labels follow: COCO category ids (torchvision) or contiguous labels (YOLO)."""
    fmt = detection_format(get_model_spec(recipe_of(model).name))
    return "category_ids" if fmt.label_map == "category_id" else "labels"


@torch.inference_mode()
def target_scores(model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> dict[str, float]:
    """COCO box ``map``, ``map50`` and ``ar100`` (in [0, 1]) of a qz detector against the batches' own targets."""
    detector = as_detector(model)
    model.eval()
    identity = CategoryMap("category_id", ())
    targets: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
        sizes = [tuple(target["image_size"]) for target in batch.targets]
        detections = detector.detect(detector.detection_inputs(batch.image_list), sizes)
        for detection, target in zip(detections, batch.targets, strict=True):
            targets.append(target)
            labels = detection["labels"]
            results += coco_results(len(targets), detection["boxes"], detection["scores"], labels, identity)
    if not targets:
        raise QzError("Scoring saw no images: the data is empty.")
    return coco_scores(coco_from_targets(targets, _label_key(model)), results, list(range(1, len(targets) + 1)))


@dataclass
class DetectionScores(TimedScores):
    """COCO box metrics (in [0, 1]) of one model, with its detection count and the time it took."""

    map: float
    map50: float
    ar100: float
    detections: int
    images: int
    seconds: float


@dataclass
class DetectionEval(Fp32Int8Result):
    """FP32 and INT8 COCO scores of one detector on one annotated image folder."""

    METRICS = ("map", "map50", "ar100")

    model: str
    weights: str | None
    images_dir: str
    annotations: str
    images: int
    label_map: str
    fp32: DetectionScores | None = None
    int8: DetectionScores | None = None
    int8_source: str | None = None
    backend: str | None = None
    calibration: str | None = None

    COLUMNS = (("mAP", "map", ".3f"), ("mAP50", "map50", ".3f"), ("AR100", "ar100", ".3f"), ("dets", "detections", "d"))
    DELTAS = (("mAP delta", "map", ".3f"), ("mAP50 delta", "map50", ".3f"))

    def heading(self) -> list[str]:
        """What was evaluated, on what."""
        return [
            f"{self.model} ({self.weights or 'random weights'}) on {self.images_dir}",
            f"{self.images} images, annotations {self.annotations}, labels mapped: {self.label_map}",
        ]


def _first(batch: list[Any]) -> Any:
    return batch[0]


def _timed_scores(
    model: nn.Module, evaluated: Subset, fmt: Any, category_map: CategoryMap, desc: str, workers: int, progress: bool
) -> DetectionScores:
    dataset: CocoImages = evaluated.dataset
    start = time.perf_counter()
    data = DataLoader(evaluated, batch_size=1, collate_fn=_first, num_workers=workers)
    results = detect_coco(model, data, fmt, category_map, desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    scores = coco_scores(dataset.coco, results, [dataset.ids[i] for i in evaluated.indices])
    return DetectionScores(**scores, detections=len(results), images=len(evaluated), seconds=seconds)


@dataclass
class CocoSplit:
    """The images of a COCO evaluation: those evaluated, and those that calibrate PTQ.

    Without a calibration folder, up to ``calib_batches`` images (a fifth at most) are held out of both
    evaluations to calibrate. The same seed draws the held-out images, the ``limit`` sample and the order
    calibration feeds them in.
    """

    evaluated: Subset
    calibration: Any = None
    description: str = ""
    batches: int = 0
    seed: int = 0

    @classmethod
    def of(
        cls, dataset: CocoImages, calib_images: Any, calib_batches: int, limit: int | None, seed: int, quantize: bool
    ) -> CocoSplit:
        """The split of ``dataset``.

        Raises:
            QzError: PTQ without a calibration folder on a single annotated image.
        """
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        calibration, description = None, ""
        if quantize and calib_images is not None:
            calibration = image_dataset(calib_images, to_tensor, purpose="calibration")
            description = f"images of {os.fspath(calib_images)}"
        elif quantize:
            if len(dataset) < 2:
                raise QzError(f"{str(dataset.root)!r} has 1 annotated image: too few to hold out calibration images.")
            hold_out = min(calib_batches, len(dataset) // 5) or 1
            calibration, order = Subset(dataset, sorted(order[:hold_out])), order[hold_out:]
            description = f"{hold_out} of the {len(dataset)} images, held out (not evaluated)"
        evaluated = Subset(dataset, sorted(order[:limit] if limit is not None else order))
        return cls(evaluated, calibration, description, calib_batches, seed)

    def quantize(self, prepared: nn.Module, to_input: Any, progress: bool) -> tuple[nn.Module, str]:
        """``prepared`` calibrated on the calibration images (each through ``to_input``) and converted, with a note."""
        shuffled = torch.randperm(len(self.calibration), generator=torch.Generator().manual_seed(self.seed)).tolist()
        seen = calibrate(
            prepared, (to_input(self.calibration[i][0]) for i in shuffled[: self.batches]), progress=progress
        )
        return convert(prepared, inplace=True), f"{self.description}, {seen} images fed"


def evaluate_detector(
    model: str | None = None,
    *,
    data: str | os.PathLike,
    split: str = "val2017",
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
    label_map: str | None = None,
    image_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    workers: int = 0,
    progress: bool = True,
    seed: int = 0,
) -> DetectionEval:
    """COCO box mAP@[.5:.95], mAP@.5 and AR@100 of a detector, in FP32 and INT8.

    Args:
        model: registered detection model name; optional with ``int8`` (its file names the model).
        data: a COCO root (``<split>/`` images, ``annotations/instances_<split>.json``), or with
            ``annotations`` the images folder itself.
        split: the split of a COCO root.
        annotations: a COCO instances JSON file (then ``data`` is its images folder).
        weights: enum name (``"DEFAULT"``) or float checkpoint (YOLO: a ``.pt`` or state dict file).
        quantize: ``"ptq"`` to also quantize the float model and evaluate it.
        int8: an INT8 model file written by ``qz_core.save_quantized`` to evaluate as the INT8 row.
        calib_images: a folder of images that calibrates PTQ; without it up to ``calib_batches``
            evaluation images are held out (and left out of both evaluations).
        calib_batches: number of calibration images.
        backend, activation_observer: PTQ engine and activation observer (the engine's defaults).
        limit: evaluate this many images (a seeded sample).
        num_classes: class count of a checkpoint with its own head.
        label_map: ``"category_id"`` or ``"contiguous"`` (``qz_detection.coco.LABEL_MAPS``);
            torchvision detectors default to the first, YOLO to the second.
        image_size: YOLO's letterbox size (default: the model's input size, 640).
        model_kwargs: further builder arguments (torchvision's ``min_size``, ``score_thresh``, ...).
        progress: show tqdm bars.
        seed: seed of the held-out and ``limit`` samples.

    Raises:
        QzError: bad names, folders, annotation files, missing images, or a model that is not a detector.
    """
    check_eval_options(quantize, int8, calib_batches=calib_batches, limit=limit)
    model, spec, int8_model = resolve_eval_model(model, int8, "detection", "evaluate_detector()")
    builder = get_model_builder(model)

    fmt = detection_format(spec, image_size)
    images_dir, annotation_file = find_coco(data, split, annotations)
    dataset = CocoImages(images_dir, load_coco(annotation_file))
    kwargs = dict(model_kwargs or {}) | ({"num_classes": num_classes} if num_classes is not None else {})
    float_model = None
    if int8_model is None or weights is not None:
        float_model = builder(weights=weights, **kwargs).eval()
    first_image = dataset[0][0]
    with torch.inference_mode():
        num_labels = fmt.num_labels((float_model or int8_model).eval(), first_image)
    mode = label_map or fmt.label_map
    category_map = CategoryMap.for_model(mode, dataset.coco.getCatIds(), num_labels, fmt.first_label)

    split_plan = CocoSplit.of(dataset, calib_images if quantize else None, calib_batches, limit, seed, bool(quantize))
    evaluated = split_plan.evaluated
    ids = category_map.category_ids
    result = DetectionEval(
        model=model,
        weights=None if weights is None else str(weights),
        images_dir=str(images_dir),
        annotations=str(annotation_file),
        images=len(evaluated),
        label_map=f"{mode} ({len(ids)} categories, ids {ids[0]}..{ids[-1]})",
    )
    if float_model is not None:
        result.fp32 = _timed_scores(float_model, evaluated, fmt, category_map, "FP32", workers, progress)
    if quantize:
        options = {"backend": backend, "activation_observer": activation_observer}
        prepared = builder(weights=weights, quantize=True, **options, **kwargs)
        int8_model, result.calibration = split_plan.quantize(
            prepared, lambda image: fmt.inputs(image, prepared), progress
        )
        result.int8_source = "PTQ"
    elif int8_model is not None:
        result.int8_source = os.fspath(int8)
    if int8_model is not None:
        result.backend = set_backend(recipe_of(int8_model).options.backend)
        result.int8 = _timed_scores(int8_model, evaluated, fmt, category_map, "INT8", workers, progress)
    return result
