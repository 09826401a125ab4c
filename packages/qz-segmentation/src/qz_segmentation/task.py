"""The ``segmentation`` task: how core reads, batches, trains, exports, predicts, draws and scores segmenters."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from qz_core import ModelSpec, QzError, Task
from qz_core.data import image_files
from qz_core.task import Transform
from qz_segmentation.data import (
    PAIR_IMAGES,
    ImageList,
    image_mask_folder,
    is_pair_folder,
    pad_collate,
)
from qz_segmentation.instances import (
    InstanceBatch,
    collate_instances,
    draw_instances,
    instance_training_data,
    is_instance_model,
    is_instance_sample,
    is_instance_spec,
    random_instance_targets,
    target_instance_scores,
)
from qz_segmentation.losses import SegmentationLoss
from qz_segmentation.voc import IMAGES, VOCSegmentationFolder, voc_root

# The VOC split QAT trains on in a VOC layout.
TRAIN_SPLIT = "train"
ALPHA = 0.5
DRAW_MIN_SIDE = 480


def _voc_color(index: int) -> tuple[int, int, int]:
    """Pascal VOC's colour of class ``index`` (its palette PNGs use the same)."""
    rgb = [0, 0, 0]
    for bit in range(8):
        for channel in range(3):
            rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return rgb[0], rgb[1], rgb[2]


PALETTE = [_voc_color(k) for k in range(256)]


class SegmentationLogits(nn.Module):
    """A segmenter that returns only its ``out`` logits tensor: the deployable output, without the aux head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        output = self.model(x)
        return output["out"] if isinstance(output, Mapping) else output


def _check_folder(folder: Path, purpose: str) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise QzError(f"The {purpose} folder {str(root)!r} does not exist (or is not a folder).")
    return root


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _draw_legend(draw: ImageDraw.ImageDraw, size: tuple[int, int], entries: list[tuple[str, Any]], px: int) -> None:
    """Colour swatches and class names in rows at the bottom of a ``size`` picture, on a white band."""
    width, height = size
    font, pad = _font(px), px // 2
    rows: list[list[tuple[int, str, Any]]] = [[]]
    x = pad
    for label, color in entries:
        item_width = px + pad + int(font.getlength(label)) + 2 * pad
        if rows[-1] and x + item_width > width:
            rows.append([])
            x = pad
        rows[-1].append((x, label, color))
        x += item_width
    top = height - len(rows) * (px + pad) - pad
    draw.rectangle((0, top, width, height), fill=(255, 255, 255, 200))
    for r, row in enumerate(rows):
        y = top + pad + r * (px + pad)
        for x, label, color in row:
            draw.rectangle((x, y, x + px, y + px), fill=color, outline="black")
            draw.text((x + px + pad, y), label, fill="black", font=font)


class SegmentationTask(Task):
    """Semantic segmentation (FCN, DeepLabV3, LRASPP; scored by mIoU) and instance segmentation (Mask R-CNN).

    What an instance family does differently lives on its model class (``qz_segmentation.instances``).
    """

    name = "segmentation"
    metric = "mIoU"
    score_key = "miou"
    calibration_layouts = (
        "an image folder (subfolders read, hidden ones skipped), the JPEGImages/ of a Pascal VOC folder, "
        "or the images/ of an image/mask folder pair"
    )
    training_layouts = (
        f"a Pascal VOC folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{TRAIN_SPLIT}.txt) "
        "or an image/mask folder pair (images/x.jpg with masks/x.png, same stem; 255 = ignore); instance models: "
        "a COCO folder (images/ and one instances *.json with polygons or RLE, or train2017/ and "
        "annotations/instances_train2017.json)"
    )

    def default_transform(self, spec: ModelSpec) -> Transform:
        """torchvision's segmentation preset: shorter side resized to the spec's size, ImageNet normalization."""
        from torchvision.transforms._presets import SemanticSegmentation

        return SemanticSegmentation(resize_size=min(spec.input_size))

    def calibration_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """The images of ``folder`` (see ``calibration_layouts``) through ``transform``; sizes may differ."""
        root = _check_folder(folder, "calibration")
        voc = voc_root(root)
        if voc is not None:
            files = image_files(voc / IMAGES)
        elif is_pair_folder(root):
            files = image_files(root / PAIR_IMAGES)
        else:
            files = image_files(root, recursive=True)
        if not files:
            raise QzError(f"The calibration folder {str(root)!r} holds no images; expected {self.calibration_layouts}.")
        return ImageList(files, transform)

    def training_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """(image, mask) pairs of ``folder`` (see ``training_layouts``), transformed jointly."""
        root = _check_folder(folder, "training")
        if is_instance_spec(spec):
            return instance_training_data(root, transform)
        voc = voc_root(root)
        if voc is not None:
            return VOCSegmentationFolder(voc, TRAIN_SPLIT, transform)
        if is_pair_folder(root):
            return image_mask_folder(root, transform)
        raise QzError(f"The training folder {str(root)!r} is neither layout QAT reads: {self.training_layouts}.")

    def collate(self, samples: Sequence[Any]) -> Any:
        """Pads images (and masks) to the largest of the batch: images with 0, masks with 255 (ignored).

        The transform at ``spec.input_size`` (``SemanticSegmentation``) resizes the shorter side and keeps
        the aspect ratio, so images of other shapes differ in size. Padding, as torchvision's segmentation
        reference does, keeps every image at the scale and shape the model sees at evaluation; resizing
        to one size would stretch objects. Zero is the mean colour after normalization, and padded mask
        pixels do not count in the loss.
        """
        if samples and is_instance_sample(samples[0]):
            return collate_instances(samples)
        return pad_collate(samples)

    def model_inputs(self, batch: Any) -> Any:
        """The images of a batch (an ``InstanceBatch``'s too)."""
        return batch.images if isinstance(batch, InstanceBatch) else super().model_inputs(batch)

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """``SegmentationLoss`` (``out`` plus 0.5 x ``aux``, 255 ignored) of one (images, masks) batch.

        Instance segmenters: their own loss (``InstanceSegmenter.instance_loss``) of an ``InstanceBatch``.
        """
        if is_instance_model(model):
            return model.instance_loss(batch.images, batch.targets or [])
        images, masks = batch
        return SegmentationLoss()(model(images), masks)

    def headline_key(self, spec: ModelSpec) -> str:
        """``mask_map`` for instance segmenters (Mask R-CNN), ``miou`` for semantic ones."""
        return "mask_map" if is_instance_spec(spec) else self.score_key

    def score(self, model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> dict[str, float]:
        """Mean IoU and pixel accuracy (percent) and per-pixel cross-entropy over (images, masks) batches."""
        from qz_segmentation.evaluate import segmentation_scores

        if is_instance_model(model):  # InstanceBatches: COCO box and mask mAP
            return target_instance_scores(model, batches, progress=progress)
        return segmentation_scores(model, batches, progress=progress)

    def export_module(self, model: nn.Module) -> nn.Module:
        """``model`` returning its ``out`` logits tensor (the aux head is for training only); an instance
        segmenter's own dense network."""
        if is_instance_model(model):
            return model.export_module()
        return SegmentationLogits(model)

    def example_training_batch(self, spec: ModelSpec, batch_size: int = 2) -> tuple[Tensor, Tensor] | InstanceBatch:
        """Random images and masks of classes 0 and 1, a quarter of the pixels ignored (255).

        Instance models: random images with two random objects each (boxes, elliptic masks, category id 1).
        """
        if is_instance_spec(spec):
            images = torch.rand(batch_size, 3, *spec.input_size, generator=torch.Generator().manual_seed(0))
            return InstanceBatch(images, random_instance_targets(images))
        height, width = spec.input_size
        masks = torch.randint(0, 2, (batch_size, height, width))
        masks[torch.rand(batch_size, height, width) < 0.25] = 255
        return torch.rand(batch_size, 3, height, width), masks

    def settle_random_weights(self, model: nn.Module, inputs: Sequence[Any]) -> None:
        """BatchNorm statistics from ``inputs``; an instance segmenter settles itself (heads re-initialized too)."""
        if is_instance_model(model):
            model.settle_random_weights(inputs)
        else:
            super().settle_random_weights(model, inputs)

    @torch.inference_mode()
    def predict(self, model: nn.Module, images: Sequence[Image.Image], transform: Transform) -> list[Any]:
        """Per image an ``(H, W)`` int64 map of class indices at the image's own size.

        Instance segmenters: per image a dict of ``boxes``, ``labels``, ``scores`` and boolean ``masks`` (N, H, W).
        """
        from qz_segmentation.evaluate import logits_of

        model.eval()
        if is_instance_model(model):
            inputs = [transform(image.convert("RGB")) for image in images]
            return model.segment_instances(inputs, [(image.height, image.width) for image in images])
        predictions = []
        for image in images:
            logits = logits_of(model(transform(image.convert("RGB")).unsqueeze(0)))
            logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
            predictions.append(logits.argmax(1)[0])
        return predictions

    def draw(self, image: Image.Image, prediction: Any, class_names: Sequence[str] | None, title: str) -> Image.Image:
        """``image`` (at least ``DRAW_MIN_SIDE`` on its long side) with the classes painted over it, a title, a legend.

        Class 0 (the background of VOC-style labels) is left clear; the title sits on a band at the top,
        the legend of the classes found on a band at the bottom. An instance prediction (a dict) is drawn
        by ``draw_instances``: semi-transparent masks, boxes and labels.
        """
        from torchvision.transforms.functional import pil_to_tensor
        from torchvision.utils import draw_segmentation_masks

        if isinstance(prediction, Mapping):
            return draw_instances(image, prediction, class_names, title)
        mask = torch.as_tensor(prediction)
        if tuple(mask.shape) != (image.height, image.width):
            raise QzError(f"A {tuple(mask.shape)} mask does not fit a {image.width}x{image.height} image.")
        scale = max(1.0, DRAW_MIN_SIDE / max(image.size))  # small images enlarged so the legend stays legible
        if scale > 1:
            size = (round(image.height * scale), round(image.width * scale))
            image = image.resize(size[::-1])
            mask = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        present = [int(k) for k in mask.unique() if 0 < int(k) < len(PALETTE)]
        picture = pil_to_tensor(image.convert("RGB"))
        if present:
            masks = torch.stack([mask == k for k in present])
            colors = [PALETTE[k] for k in present]
            picture = draw_segmentation_masks(picture, masks, alpha=ALPHA, colors=colors)
        names = list(class_names or [])
        labels = [(f"{k} {names[k]}" if k < len(names) else str(k), PALETTE[k]) for k in present]
        px = max(10, min(image.width, image.height) // 30)
        canvas = Image.fromarray(picture.permute(1, 2, 0).numpy()).convert("RGBA")
        overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        font = _font(px)
        draw.rectangle((0, 0, image.width, 2 * px), fill=(255, 255, 255, 200))
        draw.text((px // 2, px // 2), title, fill="black", font=font)
        _draw_legend(draw, canvas.size, labels or [("no class found", "white")], px)
        return Image.alpha_composite(canvas, overlay).convert("RGB")

    def add_eval_command(self, parser: argparse.ArgumentParser) -> None:
        """``qz eval segmentation``: mIoU and pixel accuracy on a VOC-layout folder (instance models: COCO box and
        mask mAP on a COCO folder), FP32 beside INT8."""
        from qz_core.cli.evaluation import add_eval_arguments
        from qz_detection.coco import LABEL_MAPS

        parser.description = (
            "Mean IoU and pixel accuracy on a Pascal VOC-layout folder (JPEGImages/, SegmentationClass/ "
            "PNG masks with 255 = ignore, ImageSets/Segmentation/<split>.txt), FP32 and INT8 side by side. "
            "Instance models (Mask R-CNN): COCO box and mask mAP (pycocotools) on a COCO folder (<split>/ images "
            "and annotations/instances_<split>.json with polygons or RLE, or --annotations FILE)."
        )
        add_eval_arguments(
            parser,
            task=self.name,
            weights_help="weights name (DEFAULT, ...) or float checkpoint",
            data_help="VOC folder (or a parent holding VOC2012/ or VOCdevkit/VOC2012/); instance models: COCO folder "
            "(with --annotations: the images folder)",
        )
        parser.add_argument(
            "--split",
            default=None,
            help="ImageSets/Segmentation/<split>.txt to evaluate (default: val); instance models: <split>/ and "
            "instances_<split>.json (default: val2017)",
        )
        parser.add_argument(
            "--annotations", default=None, help="instance models: COCO instances JSON (--data: its images)"
        )
        parser.add_argument(
            "--calib-images", default=None, help="instance models: images that calibrate PTQ (default: held out)"
        )
        parser.add_argument(
            "--label-map",
            choices=sorted(LABEL_MAPS),
            default="category_id",
            help="instance models: model label -> category id (default: category_id, torchvision's COCO labels)",
        )
        parser.add_argument("--calib-split", default=None, help="split that calibrates PTQ (default: held-out images)")
        parser.add_argument("--aux-loss", action="store_true", help="the checkpoint holds an aux classifier")
        parser.set_defaults(func=_cmd_eval)

    def add_demo_command(self, parser: argparse.ArgumentParser) -> bool:
        """``qz demo --task segmentation``: digit canvases, FP32 vs INT8 PTQ vs INT8 QAT (qz_segmentation.demo)."""
        from qz_segmentation.demo import add_demo_arguments

        add_demo_arguments(parser)
        return True


def _cmd_eval(args: argparse.Namespace) -> int:
    from qz_core.cli.evaluation import report_eval, shared_eval_options
    from qz_segmentation.evaluate import (
        COCO_SPLIT,
        evaluate_instance_segmenter,
        evaluate_segmenter,
        names_instance_model,
    )

    if names_instance_model(args.model, args.int8):
        result = evaluate_instance_segmenter(
            args.model,
            split=args.split or COCO_SPLIT,
            annotations=args.annotations,
            calib_images=args.calib_images,
            label_map=args.label_map,
            **shared_eval_options(args),
        )
        return report_eval(result, args.json)
    result = evaluate_segmenter(
        args.model,
        split=args.split or "val",
        calib_split=args.calib_split,
        aux_loss=True if args.aux_loss else None,
        **shared_eval_options(args),
    )
    return report_eval(result, args.json)


TASK = SegmentationTask()
