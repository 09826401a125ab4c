"""The detection task: the one object through which qz-core knows qz-detection.

What differs between torchvision detectors and YOLO (input batching, loss, decoding, the exported
network) lives on each model class (``qz_detection.detector.QuantizableDetector``); the task
dispatches to it. Import-light: no ultralytics, pycocotools or matplotlib at import time.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms._presets import ObjectDetection
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from qz_core import ModelSpec, Task
from qz_core.cli.evaluation import add_eval_arguments, report_eval, shared_eval_options
from qz_detection.coco import LABEL_MAPS
from qz_detection.data import CALIBRATION_LAYOUTS, TRAINING_LAYOUTS, PhotoFolder, Transform, training_dataset
from qz_detection.detector import Detection, DetectionBatch, as_detector, random_targets, stack_or_list

TITLE_HEIGHT = 28
DRAW_MIN_SCORE = 0.3
DRAW_MIN_SIDE = 480
# Distinct, saturated colours (Tableau 10) that read on photos.
BOX_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


class DetectionTask(Task):
    """Object detection: boxes, labels and scores per image; scored by COCO box mAP."""

    name = "detection"
    metric = "box mAP"
    score_key = "map"
    calibration_layouts = CALIBRATION_LAYOUTS
    training_layouts = TRAINING_LAYOUTS

    def default_transform(self, spec: ModelSpec) -> Transform:
        """torchvision's detection preset: the image as a float tensor in [0, 1] (detectors resize inside)."""
        return ObjectDetection()

    def calibration_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """The photos of ``folder``, of any sizes (hidden files skipped)."""
        return PhotoFolder(folder, transform)

    def training_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """(image, target) samples from a YOLO txt or COCO json folder."""
        return training_dataset(folder, transform)

    def collate(self, samples: Sequence[Any]) -> DetectionBatch:
        """A ``DetectionBatch``: images stacked when they share a size (letterboxed), else a list; targets if any."""
        if samples and isinstance(samples[0], tuple):
            images, targets = zip(*samples, strict=True)
            return DetectionBatch(stack_or_list(images), list(targets))
        return DetectionBatch(stack_or_list(samples))

    def model_inputs(self, batch: Any) -> Any:
        """The images of a batch (what every detector is called with)."""
        return batch.images if isinstance(batch, DetectionBatch) else super().model_inputs(batch)

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The model's own detection loss (torchvision's loss dict summed, or ultralytics' YOLO loss)."""
        if not isinstance(batch, DetectionBatch):
            batch = DetectionBatch(*batch)
        return as_detector(model).detection_loss(batch.images, batch.targets or [])

    def score(self, model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> dict[str, float]:
        """COCO box mAP@[.5:.95], mAP@.5 and AR@100 against the batches' targets (``DetectionBatch``es)."""
        from qz_detection.evaluate import target_scores

        return target_scores(model, batches, progress=progress)

    def export_module(self, model: nn.Module) -> nn.Module:
        """The dense network (torchvision detectors: raw head outputs; YOLO: decoded predictions)."""
        return as_detector(model).export_module()

    def example_training_batch(self, spec: ModelSpec, batch_size: int = 2) -> DetectionBatch:
        """Random images of the model's size with two random boxes each (labels 0, category ids 1)."""
        images = torch.rand(batch_size, 3, *spec.input_size, generator=torch.Generator().manual_seed(0))
        return DetectionBatch(images, random_targets(images))

    def settle_random_weights(self, model: nn.Module, inputs: Sequence[Any]) -> None:
        """The model's own settling (detector heads re-initialized, BatchNorm statistics from ``inputs``)."""
        as_detector(model).settle_random_weights(inputs)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[Image.Image], transform: Transform) -> list[Detection]:
        """``boxes`` (xyxy, the image's pixels), ``labels`` and ``scores`` per image."""
        detector = as_detector(model)
        model.eval()
        inputs = detector.detection_inputs([transform(image.convert("RGB")) for image in images])
        return detector.detect(inputs, [(image.height, image.width) for image in images])

    def draw(
        self, image: Image.Image, prediction: Detection, class_names: Sequence[str] | None, title: str
    ) -> Image.Image:
        """Boxes scoring at least ``DRAW_MIN_SCORE``, a colour per class, with names and scores, under a title.

        Small images are enlarged first (to ``DRAW_MIN_SIDE`` on the long side) so labels stay legible;
        PIL's default font draws offline.
        """
        scale = max(1.0, DRAW_MIN_SIDE / max(image.size))
        picture = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)))
        keep = prediction["scores"] >= DRAW_MIN_SCORE
        labels = [int(k) for k in prediction["labels"][keep]]
        if labels:
            texts = [
                f"{_class_name(k, class_names)} {float(s):.2f}"
                for k, s in zip(labels, prediction["scores"][keep], strict=True)
            ]
            boxes = prediction["boxes"][keep].detach().float() * scale
            colors = [BOX_COLORS[k % len(BOX_COLORS)] for k in labels]
            width = max(2, round(max(picture.size) / 300))
            drawn = draw_bounding_boxes(pil_to_tensor(picture), boxes, texts, colors=colors, width=width)
            picture = to_pil_image(drawn)
        canvas = Image.new("RGB", (picture.width, picture.height + TITLE_HEIGHT), "white")
        canvas.paste(picture, (0, TITLE_HEIGHT))
        caption = f"{title} (score >= {DRAW_MIN_SCORE})"
        ImageDraw.Draw(canvas).text((6, 4), caption, fill="black", font=ImageFont.load_default(size=TITLE_HEIGHT - 10))
        return canvas

    def add_eval_command(self, parser: argparse.ArgumentParser) -> None:
        """``qz eval detection``: COCO box mAP@[.5:.95], mAP@.5 and AR@100, FP32 beside INT8."""
        from qz_core.cli.arguments import positive_int

        parser.description = (
            "COCO box mAP@[.5:.95], mAP@.5 and AR@100 (pycocotools) on a COCO-layout folder (<split>/ images "
            "and annotations/instances_<split>.json, or --annotations FILE with the images folder as --data), "
            "FP32 and INT8 side by side."
        )
        add_eval_arguments(
            parser,
            task=self.name,
            weights_help="weights name (DEFAULT, COCO_V1, ...) or float checkpoint (YOLO: ultralytics .pt)",
            data_help="COCO folder holding <split>/ and annotations/ (with --annotations: the images folder)",
        )
        parser.add_argument(
            "--split", default="val2017", help="images folder and instances_<split>.json (default: val2017)"
        )
        parser.add_argument("--annotations", default=None, help="COCO instances JSON; --data is then the images")
        parser.add_argument("--calib-images", default=None, help="images that calibrate PTQ (default: held out)")
        parser.add_argument(
            "--label-map",
            choices=sorted(LABEL_MAPS),
            default=None,
            help="model label -> category id: " + "; ".join(f"{k}: {v}" for k, v in LABEL_MAPS.items()),
        )
        parser.add_argument(
            "--image-size", type=positive_int, default=None, help="YOLO letterbox long side in px (default: 640)"
        )
        parser.set_defaults(func=_run_eval)

    def add_demo_command(self, parser: argparse.ArgumentParser) -> bool:
        """``qz demo --task detection``: digit canvases, FP32 vs INT8 PTQ vs INT8 QAT (qz_detection.demo)."""
        from qz_detection.demo import add_demo_arguments

        add_demo_arguments(parser)
        return True


def _run_eval(args: argparse.Namespace) -> int:
    from qz_detection.evaluate import evaluate_detector

    result = evaluate_detector(
        args.model,
        split=args.split,
        annotations=args.annotations,
        calib_images=args.calib_images,
        label_map=args.label_map,
        image_size=args.image_size,
        **shared_eval_options(args),
    )
    return report_eval(result, args.json)


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


TASK = DetectionTask()
