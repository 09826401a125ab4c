"""Detection folders: photos to calibrate on, and labelled folders (COCO json or YOLO txt) for QAT.

Training samples are ``(image, target)``: the transformed image and its target in the original
image's pixels (see ``qz_detection.detector``); each model maps boxes onto its own input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from qz_core import QzError
from qz_core.data import IMAGE_EXTENSIONS, image_files, read_rgb
from qz_detection.detector import Target

Transform = Callable[[Image.Image], Any]
CALIBRATION_LAYOUTS = "a flat folder of photos (any sizes), or a training folder (its images/ are used)"
TRAINING_LAYOUTS = (
    "YOLO txt (images/ and labels/ with 'cls cx cy w h' normalized per line) or COCO json "
    "(an instances *.json in the folder or in annotations/, the images in images/ or <split>/)"
)


def _folder(path: str | os.PathLike, purpose: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise QzError(f"The {purpose} folder {str(root)!r} does not exist (or is not a folder).")
    return root


class PhotoFolder(Dataset):
    """The photos of one folder, transformed, for calibration (no labels)."""

    def __init__(self, folder: str | os.PathLike, transform: Transform) -> None:
        root = _folder(folder, "calibration")
        files = image_files(root)
        if not files and (root / "images").is_dir():
            files = image_files(root / "images")
        if not files:
            raise QzError(
                f"The calibration folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"expected {CALIBRATION_LAYOUTS}."
            )
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        return self.transform(read_rgb(self.files[index]))


class LabelledImages(Dataset):
    """(image, target) pairs from image files, their xyxy boxes (``normalized``: in [0, 1]) and labels."""

    def __init__(
        self, items: list[tuple[Path, Tensor, Tensor, Tensor]], transform: Transform, normalized: bool = False
    ) -> None:
        self.items, self.transform, self.normalized = items, transform, normalized

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        path, boxes, labels, category_ids = self.items[index]
        image = read_rgb(path)
        size = (image.height, image.width)
        if self.normalized:
            boxes = boxes * torch.tensor([size[1], size[0]] * 2, dtype=torch.float32)
        target = {"boxes": boxes, "labels": labels, "category_ids": category_ids, "image_size": size}
        return self.transform(image), target


def yolo_txt_items(root: Path) -> list[tuple[Path, Tensor, Tensor, Tensor]]:
    """Images of ``root/images`` with their ``root/labels/<stem>.txt`` rows (normalized boxes; no file: no objects).

    Raises:
        QzError: a malformed row, naming the file and line.
    """
    items = []
    for image in image_files(root / "images"):
        rows: list[list[float]] = []
        label_file = root / "labels" / f"{image.stem}.txt"
        if label_file.is_file():
            for number, line in enumerate(label_file.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    values = [float(v) for v in line.split()]
                except ValueError:
                    values = []
                if len(values) != 5:
                    raise QzError(f"{label_file}:{number}: expected 'cls cx cy w h' (normalized); got {line!r}.")
                rows.append(values)
        table = torch.tensor(rows, dtype=torch.float32).view(-1, 5)
        cxcy, wh = table[:, 1:3], table[:, 3:5]
        boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1).clamp(0, 1)
        labels = table[:, 0].long()
        items.append((image, boxes, labels, labels + 1))
    return items


def _coco_files(root: Path) -> tuple[Path, Path]:
    candidates = sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))
    candidates = [p for p in candidates if not p.name.startswith(".")]
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise QzError(
            f"The training folder {str(root)!r} needs one COCO instances *.json (in it or in annotations/); "
            f"found {found}. Expected {TRAINING_LAYOUTS}."
        )
    annotation = candidates[0]
    split = annotation.stem.removeprefix("instances_")
    for images in (root / "images", root / split):
        if images.is_dir():
            return images, annotation
    raise QzError(f"No images folder for {annotation.name}: expected {root / 'images'} or {root / split}.")


def coco_json_items(root: Path) -> list[tuple[Path, Tensor, Tensor, Tensor]]:
    """Images and non-crowd boxes of a COCO instances file (labels: index of the sorted category ids)."""
    images, annotation = _coco_files(root)
    try:
        payload = json.loads(annotation.read_text())
        categories = sorted(int(c["id"]) for c in payload["categories"])
        per_image: dict[int, list[dict[str, Any]]] = {int(i["id"]): [] for i in payload["images"]}
        for a in payload["annotations"]:
            if not a.get("iscrowd", 0):
                per_image[int(a["image_id"])].append(a)
        files = {int(i["id"]): i["file_name"] for i in payload["images"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise QzError(f"{str(annotation)!r} is not a COCO instances file: {type(exc).__name__}: {exc}.") from None
    items = []
    for image_id, anns in per_image.items():
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).view(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        category_ids = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.long)
        labels = torch.tensor([categories.index(int(c)) for c in category_ids.tolist()], dtype=torch.long)
        items.append((images / files[image_id], boxes, labels, category_ids))
    absent = [str(path.name) for path, *_ in items if not path.is_file()]
    if absent:
        raise QzError(f"{annotation.name} lists images that {str(images)!r} lacks: {', '.join(absent[:5])}.")
    return items


def training_dataset(folder: str | os.PathLike, transform: Transform) -> LabelledImages:
    """QAT samples from a YOLO txt or COCO json folder (see ``TRAINING_LAYOUTS``).

    Raises:
        QzError: the folder is missing, in neither layout, or holds no labelled image.
    """
    root = _folder(folder, "training")
    normalized = (root / "images").is_dir() and (root / "labels").is_dir()
    items = yolo_txt_items(root) if normalized else coco_json_items(root)
    if not items:
        raise QzError(f"The training folder {str(root)!r} holds no images; expected {TRAINING_LAYOUTS}.")
    return LabelledImages(items, transform, normalized)
