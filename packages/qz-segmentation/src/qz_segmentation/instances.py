"""Instance segmentation in the segmentation task: the model protocol, batches, drawing and COCO masks.

Semantic segmenters (FCN, DeepLabV3, LRASPP) return per-pixel logits; instance segmenters (Mask R-CNN)
return boxes, labels, scores and one mask per object. What an instance family does (its loss, its
decoding, its exported network) lives on its model class behind ``InstanceSegmenter``; the task checks
the protocol (or, given only a spec, ``is_instance_spec``) and dispatches.

Targets and predictions are in the original image's pixels: ``boxes`` (N, 4) xyxy, ``labels`` (N,) (the
model's label, torchvision's COCO category id), ``masks`` (N, H, W) boolean or 0/1; targets also carry
``category_ids`` (N,) and ``image_size`` (H, W), as qz-detection's do. pycocotools is imported when used.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.utils.data import Dataset

from qz_core import ModelSpec, QzError
from qz_detection.task import BOX_COLORS

if TYPE_CHECKING:
    from pycocotools.coco import COCO

    from qz_detection.coco import CategoryMap

InstanceTarget = dict[str, Any]
InstancePrediction = dict[str, Tensor]

MASK_THRESHOLD = 0.5
DRAW_MIN_SCORE = 0.3
DRAW_MIN_SIDE = 480
MASK_ALPHA = 0.45
TITLE_HEIGHT = 28
_INSTANCE_FAMILIES: set[str] = set()


@runtime_checkable
class InstanceSegmenter(Protocol):
    """The methods the segmentation task calls on an instance segmenter (float, prepared or INT8)."""

    def instance_loss(self, images: Tensor | list[Tensor], targets: Sequence[InstanceTarget]) -> Tensor:
        """The training loss of one batch (model in training mode); targets in original pixels."""

    def segment_instances(
        self, images: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[InstancePrediction]:
        """``boxes``, ``labels``, ``scores`` and boolean ``masks`` per image, in original pixels (eval mode)."""

    def export_module(self) -> nn.Module:
        """The deployable dense network that goes to ONNX and is compared FP32 vs INT8."""

    def settle_random_weights(self, inputs: Sequence[Any]) -> None:
        """Makes random-weight activations realistic for probes and benchmarks."""


def register_instance_family(family: str) -> None:
    """Marks a model family (``ModelSpec.family``) as instance segmentation, for hooks that see only the spec."""
    _INSTANCE_FAMILIES.add(family)


def is_instance_spec(spec: ModelSpec) -> bool:
    """True for a registered instance-segmentation family."""
    return spec.family in _INSTANCE_FAMILIES


def is_instance_model(model: nn.Module) -> bool:
    """True when ``model`` implements ``InstanceSegmenter``."""
    return isinstance(model, InstanceSegmenter)


@dataclass
class InstanceBatch:
    """Images (stacked when they share a size, else a list) and their instance targets (None to calibrate)."""

    images: Tensor | list[Tensor]
    targets: list[InstanceTarget] | None = None


def is_instance_sample(sample: Any) -> bool:
    """An (image, target dict) pair, as instance training data yields."""
    return isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[1], dict)


def collate_instances(samples: Sequence[tuple[Tensor, InstanceTarget]]) -> InstanceBatch:
    """An ``InstanceBatch`` of (image, target) samples; images stacked when they share a size."""
    images, targets = zip(*samples, strict=True)
    stacked = torch.stack(images) if len({tuple(i.shape) for i in images}) == 1 else list(images)
    return InstanceBatch(stacked, list(targets))


def random_instance_targets(images: Tensor, objects_per_image: int = 2, seed: int = 0) -> list[InstanceTarget]:
    """Valid random boxes whose masks are filled ellipses inside them (category ids 1), for QAT on random data."""
    generator = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    size = torch.tensor([w, h], dtype=torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    targets = []
    for _ in range(len(images)):
        xy = torch.rand(objects_per_image, 2, generator=generator) * size / 2
        boxes = torch.cat([xy, torch.minimum(xy + (0.2 + 0.3 * torch.rand(2, generator=generator)) * size, size)], 1)
        centers, radii = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        inside = ((xs - centers[:, None, None, 0]) / radii[:, None, None, 0]) ** 2
        inside = inside + ((ys - centers[:, None, None, 1]) / radii[:, None, None, 1]) ** 2
        labels = torch.ones(objects_per_image, dtype=torch.long)
        targets.append(
            {
                "boxes": boxes,
                "labels": labels,
                "category_ids": labels,
                "masks": (inside <= 1).to(torch.uint8),
                "image_size": (int(h), int(w)),
            }
        )
    return targets


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def draw_instances(
    image: Image.Image, prediction: InstancePrediction, class_names: Sequence[str] | None, title: str
) -> Image.Image:
    """Objects scoring at least ``DRAW_MIN_SCORE``: semi-transparent masks and boxes, a colour per object, labelled.

    Small images are enlarged first (to ``DRAW_MIN_SIDE`` on the long side) so labels stay legible.

    Raises:
        QzError: masks that do not fit the image.
    """
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    masks = torch.as_tensor(prediction["masks"]).bool()
    if masks.numel() and tuple(masks.shape[-2:]) != (image.height, image.width):
        raise QzError(f"{tuple(masks.shape[-2:])} masks do not fit a {image.width}x{image.height} image.")
    scale = max(1.0, DRAW_MIN_SIDE / max(image.size))
    size = (round(image.height * scale), round(image.width * scale))
    picture = pil_to_tensor(image.convert("RGB").resize(size[::-1]))
    keep = prediction["scores"] >= DRAW_MIN_SCORE
    labels = [int(k) for k in prediction["labels"][keep]]
    if labels:
        colors = [BOX_COLORS[i % len(BOX_COLORS)] for i in range(len(labels))]
        kept = masks[keep]
        if scale > 1:
            kept = torch.nn.functional.interpolate(kept[:, None].float(), size=size, mode="nearest")[:, 0].bool()
        for mask, color in zip(kept, colors, strict=True):  # one by one: overlaps blend rather than darken
            picture = draw_segmentation_masks(picture, mask[None], alpha=MASK_ALPHA, colors=[color])
        texts = [
            f"{_class_name(k, class_names)} {float(s):.2f}"
            for k, s in zip(labels, prediction["scores"][keep], strict=True)
        ]
        boxes = prediction["boxes"][keep].detach().float() * scale
        width = max(2, round(max(size) / 300))
        picture = draw_bounding_boxes(
            picture,
            boxes,
            texts,
            colors=colors,
            width=width,
            label_colors="white",
            label_background_colors=colors,
            fill_labels=True,
        )
    drawn = to_pil_image(picture)
    canvas = Image.new("RGB", (drawn.width, drawn.height + TITLE_HEIGHT), "white")
    canvas.paste(drawn, (0, TITLE_HEIGHT))
    caption = f"{title} ({len(labels)} objects, score >= {DRAW_MIN_SCORE})"
    ImageDraw.Draw(canvas).text((6, 4), caption, fill="black", font=_font(TITLE_HEIGHT - 10))
    return canvas


# --- COCO instance masks ------------------------------------------------------------------------


def annotation_masks(coco: COCO, image_id: int) -> tuple[list[dict[str, Any]], Tensor]:
    """The non-crowd annotations of one image and their masks (N, H, W) uint8, from polygons or RLE.

    Raises:
        QzError: an annotation without a readable ``segmentation``.
    """
    info = coco.imgs[image_id]
    annotations = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
    masks = []
    for annotation in annotations:
        if not annotation.get("segmentation"):
            raise QzError(f"Annotation {annotation.get('id')} of image {image_id} has no 'segmentation'.")
        try:
            masks.append(coco.annToMask(annotation))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise QzError(f"Annotation {annotation.get('id')}'s segmentation cannot be read: {exc}.") from None
    height, width = int(info["height"]), int(info["width"])
    stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
    return annotations, stacked.to(torch.uint8)


class CocoInstances(Dataset):
    """(image, target) pairs of a COCO instances file: boxes, labels (= category ids) and masks per image.

    Images without a non-crowd object are left out (Mask R-CNN's loss needs one).
    """

    def __init__(self, images: str | os.PathLike, coco: COCO, transform: Any) -> None:
        self.root, self.coco, self.transform = Path(images), coco, transform
        self.ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=[i], iscrowd=False))
        if not self.ids:
            raise QzError(f"The annotation file lists no image of {str(self.root)!r} with an annotated object.")
        absent = [coco.imgs[i]["file_name"] for i in self.ids if not (self.root / coco.imgs[i]["file_name"]).is_file()]
        if absent:
            raise QzError(f"The annotation file lists images that {str(self.root)!r} lacks: {', '.join(absent[:5])}.")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, InstanceTarget]:
        from qz_core.data import read_rgb

        image_id = self.ids[index]
        image = read_rgb(self.root / self.coco.imgs[image_id]["file_name"])
        annotations, masks = annotation_masks(self.coco, image_id)
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).view(-1, 4)
        category_ids = torch.tensor([int(a["category_id"]) for a in annotations], dtype=torch.long)
        target = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            "labels": category_ids,
            "category_ids": category_ids,
            "masks": masks,
            "image_size": (image.height, image.width),
        }
        return self.transform(image), target


def instance_training_data(folder: str | os.PathLike, transform: Any, split: str = "train2017") -> CocoInstances:
    """QAT samples of a COCO folder.

    One instances ``*.json`` (in the folder or in ``annotations/``) with its images in ``images/`` or in
    ``<split>/`` (the file being ``instances_<split>.json``); with several, ``split``'s.

    Raises:
        QzError: the folder is in neither layout, or its annotation file is not a COCO instances file.
    """
    from qz_detection.coco import find_coco, load_coco

    root = Path(folder).expanduser()
    jsons = sorted(p for p in [*root.glob("*.json"), *(root / "annotations").glob("*.json")] if p.name[0] != ".")
    if len(jsons) == 1:
        own_split = jsons[0].stem.removeprefix("instances_")
        for images in (root / "images", root / own_split):
            if images.is_dir():
                return CocoInstances(images, load_coco(jsons[0]), transform)
    images, annotations = find_coco(root, split)
    return CocoInstances(images, load_coco(annotations), transform)


def instance_results(
    image_id: int, prediction: InstancePrediction, category_map: CategoryMap
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO box and mask (RLE) result records of one image's prediction."""
    from qz_detection.coco import coco_results

    boxes = coco_results(image_id, prediction["boxes"], prediction["scores"], prediction["labels"], category_map)
    segments = [
        {k: record[k] for k in ("image_id", "category_id", "score")} | {"segmentation": rle}
        for record, rle in zip(boxes, encode_masks(prediction["masks"]), strict=True)
    ]
    return boxes, segments


def _coco_stats(coco: COCO, results: list[dict[str, Any]], image_ids: Sequence[int], kind: str) -> list[float]:
    from pycocotools.cocoeval import COCOeval

    if not results:  # pycocotools cannot load an empty result list; no predictions score 0
        return [0.0] * 12
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), kind)
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [max(0.0, float(v)) for v in evaluation.stats]  # -1: a category without objects here


def instance_scores(
    coco: COCO, boxes: list[dict[str, Any]], segments: list[dict[str, Any]], image_ids: Sequence[int]
) -> dict[str, float]:
    """COCO box and mask mAP@[.5:.95] and mAP@.5 (in [0, 1]) of result records on ``image_ids``.

    Raises:
        QzError: the images hold no annotated object (nothing to score).
    """
    if not coco.getAnnIds(imgIds=list(image_ids), iscrowd=False):
        raise QzError(f"The {len(image_ids)} evaluated images hold no (non-crowd) annotated objects: nothing to score.")
    box_stats = _coco_stats(coco, boxes, image_ids, "bbox")
    mask_stats = _coco_stats(coco, segments, image_ids, "segm")
    return {"box_map": box_stats[0], "box_map50": box_stats[1], "mask_map": mask_stats[0], "mask_map50": mask_stats[1]}


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """COCO RLEs (``counts`` as text, JSON-ready) of boolean or 0/1 masks (N, H, W)."""
    from pycocotools import mask as mask_utils

    if not len(masks):
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0)))
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")
    return encoded


def coco_from_instance_targets(targets: Sequence[InstanceTarget]) -> COCO:
    """An in-memory COCO ground truth of instance targets: image ids 1..N, boxes, RLE masks, ``category_ids``."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images, annotations, categories = [], [], set()
    for image_id, target in enumerate(targets, start=1):
        height, width = target["image_size"]
        images.append({"id": image_id, "height": int(height), "width": int(width), "file_name": f"{image_id}.jpg"})
        rles = encode_masks(target["masks"])
        for box, label, rle in zip(target["boxes"].tolist(), target["category_ids"].tolist(), rles, strict=True):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label), "iscrowd": 0}
                | {"bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "segmentation": rle}
                | {"area": float(mask_utils.area(rle | {"counts": rle["counts"].encode("ascii")}))}
            )
            categories.add(int(label))
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in sorted(categories)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.inference_mode()
def target_instance_scores(
    model: nn.Module, batches: Sequence[InstanceBatch], *, progress: bool = True
) -> dict[str, float]:
    """COCO box and mask mAP (in [0, 1]) of an instance segmenter against the ``InstanceBatch``es' own targets."""
    from tqdm.auto import tqdm

    from qz_detection.coco import CategoryMap

    if not is_instance_model(model):
        raise QzError(f"{type(model).__name__} is not an instance segmenter (see qz_segmentation.instances).")
    model.eval()
    identity = CategoryMap("category_id", ())
    targets: list[InstanceTarget] = []
    boxes: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
        sizes = [tuple(target["image_size"]) for target in batch.targets]
        for prediction, target in zip(model.segment_instances(list(batch.images), sizes), batch.targets, strict=True):
            targets.append(target)
            image_boxes, image_segments = instance_results(len(targets), prediction, identity)
            boxes += image_boxes
            segments += image_segments
    if not targets:
        raise QzError("Scoring saw no images: the data is empty.")
    scores = instance_scores(coco_from_instance_targets(targets), boxes, segments, list(range(1, len(targets) + 1)))
    return scores
