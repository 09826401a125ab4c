"""COCO detection folders (images + ``instances_*.json``), label-to-category mapping, and COCOeval scores.

pycocotools is imported when a file is read or scored, not with this module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from qz_core import QzError
from qz_core.errors import invalid_choice

if TYPE_CHECKING:
    from pycocotools.coco import COCO

ANNOTATIONS = "annotations"
_REQUIRED_KEYS = ("images", "annotations", "categories")
# How a model's label index becomes an annotation category id.
LABEL_MAPS = {
    "category_id": "the label is the category id (torchvision's COCO detectors: 91 indices, 0 = background)",
    "contiguous": "label k is the k-th sorted category id (YOLO's 80 classes; after background 0 for torchvision)",
}


def find_coco(
    data: str | os.PathLike, split: str = "val2017", annotations: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """The images folder and annotation file of a COCO layout.

    Without ``annotations``, ``data`` is a COCO root holding ``<split>/`` (the images) and
    ``annotations/instances_<split>.json``; with it, ``data`` is the images folder itself.

    Raises:
        QzError: a missing folder or file, or an unknown split (naming the splits there are).
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        what = "images" if annotations is not None else "COCO"
        raise QzError(f"The {what} folder {str(root)!r} does not exist (or is not a folder).")
    if annotations is not None:
        annotation_file = Path(annotations).expanduser()
        if not annotation_file.is_file():
            raise QzError(f"The annotation file {str(annotation_file)!r} does not exist.")
        return root, annotation_file
    annotation_file = root / ANNOTATIONS / f"instances_{split}.json"
    if not annotation_file.is_file():
        splits = sorted(p.stem.removeprefix("instances_") for p in (root / ANNOTATIONS).glob("instances_*.json"))
        if not splits:
            raise QzError(
                f"{str(root)!r} is not a COCO folder: it lacks {ANNOTATIONS}/instances_{split}.json (expected "
                f"<split>/ with the images and {ANNOTATIONS}/instances_<split>.json; or pass the images folder "
                "as data and the annotation file as annotations)."
            )
        raise invalid_choice("split", split, splits, hint=f"Splits are the instances_*.json in {root / ANNOTATIONS}.")
    images = root / split
    if not images.is_dir():
        raise QzError(f"The images folder {str(images)!r} of split {split!r} does not exist.")
    return images, annotation_file


def load_coco(path: str | os.PathLike) -> COCO:
    """Reads a COCO instances file into pycocotools' ``COCO`` (quietly).

    Raises:
        QzError: the file is missing, not JSON, or lacks images/annotations/categories or boxes.
    """
    path = Path(path)
    try:
        dataset = json.loads(path.read_text())
    except FileNotFoundError:
        raise QzError(f"The annotation file {str(path)!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QzError(f"The annotation file {str(path)!r} is not valid JSON: {exc}.") from None
    if not isinstance(dataset, dict) or any(key not in dataset for key in _REQUIRED_KEYS):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(dataset, dict) or k not in dataset]
        raise QzError(
            f"The annotation file {str(path)!r} is not a COCO instances file: it lacks {', '.join(missing)} "
            f"(expected a JSON object with {', '.join(_REQUIRED_KEYS)})."
        )
    if not dataset["categories"]:
        raise QzError(f"The annotation file {str(path)!r} lists no categories.")
    no_box = [a.get("id") for a in dataset["annotations"] if not isinstance(a, dict) or len(a.get("bbox", ())) != 4]
    if no_box:
        raise QzError(f"Annotations {no_box[:5]} of {str(path)!r} have no [x, y, width, height] 'bbox'.")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_from_targets(targets: Sequence[dict[str, Any]], label_key: str) -> COCO:
    """An in-memory COCO ground truth of qz detection targets: image ids 1..N, categories ``target[label_key]``."""
    from pycocotools.coco import COCO

    images, annotations, categories = [], [], set()
    for image_id, target in enumerate(targets, start=1):
        height, width = target["image_size"]
        images.append({"id": image_id, "height": int(height), "width": int(width), "file_name": f"{image_id}.jpg"})
        for box, label in zip(target["boxes"].tolist(), target[label_key].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label), "iscrowd": 0}
                | {"bbox": [box[0], box[1], w, h], "area": w * h}
            )
            categories.add(int(label))
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in sorted(categories)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoImages(Dataset):
    """(image, image id) pairs: each image listed in ``coco`` as a float tensor (3, H, W) in [0, 1].

    Raises:
        QzError: the annotation file lists images that the folder lacks.
    """

    def __init__(self, images: str | os.PathLike, coco: COCO, image_ids: Sequence[int] | None = None) -> None:
        self.root = Path(images)
        self.coco = coco
        self.ids = sorted(coco.getImgIds()) if image_ids is None else list(image_ids)
        if not self.ids:
            raise QzError(f"The annotation file lists no images for {str(self.root)!r}.")
        absent = [name for name in (self.file_name(i) for i in self.ids) if not (self.root / name).is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (f", ... ({len(absent)} in all)" if len(absent) > 5 else "")
            raise QzError(f"The annotation file lists images that {str(self.root)!r} lacks: {shown}.")

    def file_name(self, image_id: int) -> str:
        return self.coco.imgs[image_id]["file_name"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image_id = self.ids[index]
        with Image.open(self.root / self.file_name(image_id)) as image:
            return to_tensor(image.convert("RGB")), image_id


@dataclass(frozen=True)
class CategoryMap:
    """Maps a model's label indices to the annotation file's category ids (see ``LABEL_MAPS``).

    Attributes:
        mode: ``"category_id"`` (label = category id) or ``"contiguous"`` (label ``first_label + k``
            is the k-th of the sorted category ids).
        category_ids: the annotation file's category ids, sorted.
        first_label: the label of the first category in contiguous mode (1 after a background class).
    """

    mode: str
    category_ids: tuple[int, ...]
    first_label: int = 0

    @classmethod
    def for_model(cls, mode: str, category_ids: Iterable[int], num_labels: int, first_label: int = 0) -> CategoryMap:
        """A map checked against a model that predicts labels ``0..num_labels - 1``.

        Raises:
            QzError: an unknown mode, or categories the model's labels cannot reach.
        """
        if mode not in LABEL_MAPS:
            raise invalid_choice("label map", mode, LABEL_MAPS)
        ids = tuple(sorted(int(i) for i in category_ids))
        if mode == "category_id" and ids[-1] >= num_labels:
            raise QzError(
                f"Category ids up to {ids[-1]} do not fit a model with {num_labels} label indices "
                f"(0..{num_labels - 1}) under label map 'category_id'; "
                "use label map 'contiguous' or a model with more classes."
            )
        if mode == "contiguous" and len(ids) != num_labels - first_label:
            raise QzError(
                f"The annotation file has {len(ids)} categories but the model predicts {num_labels - first_label} "
                "classes: label map 'contiguous' needs one class per category (pass num_classes to build the "
                "model's head for these categories, or use label map 'category_id')."
            )
        return cls(mode, ids, first_label)

    def to_category_ids(self, labels: Iterable[int]) -> list[int]:
        """Category ids of model labels."""
        if self.mode == "category_id":
            return [int(label) for label in labels]
        return [self.category_ids[int(label) - self.first_label] for label in labels]

    def to_labels(self, category_ids: Iterable[int]) -> list[int]:
        """Model labels of category ids (the inverse of ``to_category_ids``)."""
        if self.mode == "category_id":
            return [int(i) for i in category_ids]
        return [self.category_ids.index(int(i)) + self.first_label for i in category_ids]


def coco_results(
    image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor, category_map: CategoryMap
) -> list[dict[str, Any]]:
    """COCO result records of one image: ``bbox`` as [x, y, width, height] from xyxy ``boxes``."""
    xywh = boxes.detach().double().clone()
    xywh[:, 2:] -= xywh[:, :2]
    return [
        {"image_id": int(image_id), "category_id": category, "bbox": [round(float(v), 3) for v in box], "score": score}
        for box, score, category in zip(
            xywh, scores.tolist(), category_map.to_category_ids(labels.tolist()), strict=True
        )
    ]


def coco_scores(coco: COCO, results: list[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
    """COCO box mAP@[.5:.95], mAP@.5 and AR@100 (in [0, 1]) of ``results`` on ``image_ids``.

    Raises:
        QzError: the images hold no annotated object (nothing to score).
    """
    if not coco.getAnnIds(imgIds=list(image_ids), iscrowd=False):
        raise QzError(f"The {len(image_ids)} evaluated images hold no (non-crowd) annotated objects: nothing to score.")
    if not results:  # pycocotools cannot load an empty result list; no detections score 0
        return {"map": 0.0, "map50": 0.0, "ar100": 0.0}
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(0.0, float(v)) for v in evaluation.stats]  # -1: a category without objects here
    return {"map": stats[0], "map50": stats[1], "ar100": stats[8]}
