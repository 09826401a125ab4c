"""The classification task: how qz reads, trains, predicts, draws and evaluates classifiers.

Import-light: the models, the evaluation and the demo load when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from qz_classification._common import TASK as TASK_NAME
from qz_classification._common import imagenet_transform
from qz_classification.data import LAYOUT, calibration_images, training_images
from qz_core import ModelSpec, QzError, Task
from qz_core.backend import supported_backends
from qz_core.task import Transform

TOP_K = 5
DRAW_LONG_SIDE = 384
PANEL_WIDTH = 320
TITLE_HEIGHT = 28
ROW_HEIGHT = 26
MARGIN = 10


@dataclass(frozen=True)
class Classification:
    """The most likely classes of one image, most likely first.

    Attributes:
        indices: class indices.
        probabilities: their softmax probabilities.
    """

    indices: tuple[int, ...]
    probabilities: tuple[float, ...]


def logits_of(output: Any) -> Tensor:
    """The main logits of a classifier's output (GoogLeNet and Inception add auxiliary ones in training)."""
    return output if isinstance(output, Tensor) else output.logits


def _scaled(image_size: tuple[int, int]) -> tuple[int, int]:
    scale = DRAW_LONG_SIDE / max(image_size)
    width, height = image_size
    return max(1, round(width * scale)), max(1, round(height * scale))


def drawing_size(image_size: tuple[int, int], rows: int = TOP_K) -> tuple[int, int]:
    """(width, height) of ``ClassificationTask.draw``'s picture of an image of ``image_size``."""
    width, height = _scaled(image_size)
    return width + PANEL_WIDTH, TITLE_HEIGHT + max(height, 2 * MARGIN + rows * ROW_HEIGHT)


class ClassificationTask(Task):
    """Image classification: top-1/top-5 on ImageNet-style folders, cross-entropy QAT."""

    name = TASK_NAME
    metric = "top-1"
    calibration_layouts = "a flat folder of images, or one subfolder per class (ImageFolder layout)"
    training_layouts = f"one subfolder per class: {LAYOUT}"
    score_key = "top1"

    def default_transform(self, spec: ModelSpec) -> Transform:
        """ImageNet preprocessing at the model's input size."""
        return imagenet_transform(spec.input_size[0])

    def calibration_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """Images of a flat folder or of class subfolders (hidden folders skipped)."""
        return calibration_images(folder, transform)

    def training_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """(image, class index) samples of an ImageFolder layout."""
        return training_images(folder, transform)

    def training_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Cross-entropy of the model's (main) logits."""
        inputs, targets = batch
        return nn.functional.cross_entropy(logits_of(model(inputs)), targets)

    def example_training_batch(self, spec: ModelSpec, batch_size: int = 2) -> Any:
        """Random images of the model's input size, all labelled class 0."""
        return torch.rand(batch_size, 3, *spec.input_size), torch.zeros(batch_size, dtype=torch.long)

    def score(self, model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> dict[str, float]:
        """Top-1 and top-5 accuracy (percent) and mean cross-entropy over (images, labels) batches."""
        from qz_classification.evaluate import classification_scores

        return classification_scores(model, batches, progress=progress)

    def predict(self, model: nn.Module, images: Sequence[Image.Image], transform: Transform) -> list[Classification]:
        """The top-5 classes of each image."""
        batch = torch.stack([transform(image.convert("RGB")) for image in images])
        with torch.inference_mode():
            probabilities = logits_of(model.eval()(batch)).float().softmax(1)
        values, indices = probabilities.topk(min(TOP_K, probabilities.shape[1]), dim=1)
        return [Classification(tuple(i.tolist()), tuple(v.tolist())) for v, i in zip(values, indices, strict=True)]

    def draw(
        self, image: Image.Image, prediction: Classification, class_names: Sequence[str] | None, title: str
    ) -> Image.Image:
        """The image (``DRAW_LONG_SIDE`` px on its long side) beside a panel of the top classes, titled."""
        from PIL import ImageDraw, ImageFont

        width, height = drawing_size(image.size, len(prediction.indices))
        picture = image.convert("RGB").resize(_scaled(image.size))
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(picture, (0, TITLE_HEIGHT))
        pen = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        pen.text((MARGIN, 7), title, fill="black", font=font)
        left, bar_width = picture.width + MARGIN, PANEL_WIDTH - 2 * MARGIN
        for row, (index, probability) in enumerate(zip(prediction.indices, prediction.probabilities, strict=True)):
            top = TITLE_HEIGHT + MARGIN + row * ROW_HEIGHT
            pen.rectangle([left, top, left + bar_width, top + ROW_HEIGHT - 6], outline=(200, 200, 200))
            pen.rectangle(
                [left, top, left + round(bar_width * probability), top + ROW_HEIGHT - 6], fill=(160, 200, 240)
            )
            name = class_names[index] if class_names is not None and index < len(class_names) else f"class {index}"
            pen.text((left + 4, top + 4), f"{name[:36]}  {probability:.1%}", fill="black", font=font)
        return canvas

    def add_eval_command(self, parser: argparse.ArgumentParser) -> None:
        """``qz eval classification``: top-1/top-5 of FP32 and INT8 on an ImageNet-style folder."""
        from qz_core.cli.arguments import positive_int
        from qz_core.cli.evaluation import add_eval_arguments

        parser.description = (
            "Top-1/top-5 accuracy on an ImageNet-style validation folder (one folder per synset id, "
            "n01440764/..., or per class index), FP32 and INT8 side by side."
        )
        add_eval_arguments(
            parser,
            task=self.name,
            weights_help="weights name (DEFAULT, IMAGENET1K_V1, ...) or float checkpoint",
            data_help="validation folder: class folders in DIR or DIR/val",
        )
        parser.add_argument(
            "--calib", default=None, help="calibration folder for --quantize ptq (default: held-out data)"
        )
        parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
        parser.add_argument(
            "--class-index",
            default=None,
            help="file mapping folder names to class indices (JSON, or a name per line) for non-ImageNet labels",
        )
        parser.set_defaults(func=_run_eval)

    def add_demo_command(self, parser: argparse.ArgumentParser) -> bool:
        """``qz demo classification``: FP32 vs INT8 PTQ vs INT8 QAT on scikit-learn's digits (or a folder)."""
        from qz_core.cli.arguments import non_negative_int, positive_int

        parser.add_argument("--model", default="resnet18", help="classification model to train (default: resnet18)")
        parser.add_argument(
            "--weights", default=None, help="e.g. DEFAULT to fine-tune torchvision's pretrained weights"
        )
        parser.add_argument(
            "--data", default=None, help="image folder (train/ and val/, or class subfolders); default: digits"
        )
        parser.add_argument(
            "--epochs", type=non_negative_int, default=3, help="FP32 training epochs, 0 for none (default: 3)"
        )
        parser.add_argument("--qat-epochs", type=positive_int, default=1, help="QAT epochs (default: 1)")
        parser.add_argument(
            "--image-size", type=positive_int, default=64, help="digits upsampled to this size in px (default: 64)"
        )
        parser.add_argument(
            "--calib-batches", type=positive_int, default=16, help="PTQ calibration batches (default: 16)"
        )
        parser.add_argument(
            "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
        )
        parser.add_argument(
            "--out-dir", default=None, help="folder for the checkpoint, INT8 models and ONNX (default: a temp folder)"
        )
        parser.set_defaults(func=_run_demo)
        return True


def _check_class_index(path: str, num_classes: int) -> None:
    """Checks that every index of the ``--class-index`` file fits ``--num-classes``.

    Raises:
        QzError: naming the file, the folder and index past the class count, and the valid indices.
    """
    from qz_classification.imagenet import read_class_index

    name, index = max(read_class_index(path).items(), key=lambda item: item[1], default=("", -1))
    if index >= num_classes:
        raise QzError(
            f"--class-index {path!r} maps {name!r} to class {index}, but --num-classes is {num_classes} "
            f"(valid indices 0..{num_classes - 1})."
        )


def _run_eval(args: argparse.Namespace) -> int:
    from qz_classification.evaluate import evaluate_classifier
    from qz_core.cli.evaluation import report_eval, shared_eval_options

    if args.class_index is not None and args.num_classes is not None:
        _check_class_index(args.class_index, args.num_classes)
    result = evaluate_classifier(
        args.model,
        calib=args.calib,
        batch_size=args.batch_size,
        class_index=args.class_index,
        **shared_eval_options(args),
    )
    return report_eval(result, args.json)


def _run_demo(args: argparse.Namespace) -> int:
    from qz_classification.demo import run_demo

    run_demo(
        args.model,
        weights=args.weights,
        data=args.data,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        image_size=args.image_size,
        calib_batches=args.calib_batches,
        backend=args.backend,
        out_dir=args.out_dir,
    )
    return 0


TASK = ClassificationTask()
