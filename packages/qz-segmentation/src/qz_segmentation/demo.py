"""``qz demo segmentation``: FP32 vs INT8 PTQ vs INT8 QAT LRASPP on canvases of real handwritten digits.

scikit-learn's 8x8 digits are upsampled onto 128x128 photo crops (``qz_classification.digits_canvas``);
each digit's stroke pixels are its class (``digit + 1``, background 0: 11 classes). The model trains
from scratch in FP32, then ``qz_core.job.quantize_model`` makes the INT8 models by PTQ and by QAT,
and the table compares mIoU (all 11 classes), size and batch-1 latency on held-out digit images.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from qz_classification.canvas_demo import CanvasDemo, DemoResult, add_canvas_demo_arguments, run_canvas_demo
from qz_classification.digits_canvas import NUM_DIGITS
from qz_core import ModelSpec, Task
from qz_core.task import Transform
from qz_segmentation.evaluate import confusion_matrix, logits_of
from qz_segmentation.losses import IGNORE_INDEX

__all__ = ["DEMO", "DemoResult", "add_demo_arguments", "balanced_loss", "mean_iou", "run_demo"]

BACKGROUND_WEIGHT = 0.2


def mean_iou(model: nn.Module, task: Task, spec: ModelSpec, folder: Path, transform: Transform) -> float:
    """Mean IoU in [0, 1] over the background and the ten digit classes of ``folder``'s image/mask pairs."""
    data = DataLoader(task.training_data(spec, folder, transform), batch_size=16, collate_fn=task.collate)
    return confusion_matrix(model, data, NUM_DIGITS + 1, progress=False).scores()["miou"] / 100


def balanced_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy with the background weighted down (``BACKGROUND_WEIGHT``), for training from scratch.

    Strokes cover a few percent of a canvas: with plain cross-entropy a model trained from scratch
    settles on "all background" for hundreds of steps first.
    """
    images, masks = batch
    weight = torch.ones(NUM_DIGITS + 1)
    weight[0] = BACKGROUND_WEIGHT
    return F.cross_entropy(logits_of(model(images)), masks.long(), weight=weight, ignore_index=IGNORE_INDEX)


DEMO = CanvasDemo(
    task="segmentation",
    model="lraspp_mobilenet_v3_large",
    metric="mIoU",
    num_classes=NUM_DIGITS + 1,
    evaluate=mean_iou,
    epochs=20,
    qat_epochs=1,
    lr=3e-3,
    qat_lr=1e-3,
    batch_size=8,
    num_train=480,
    float_loss=balanced_loss,
)


run_demo = functools.partial(run_canvas_demo, DEMO)
add_demo_arguments = functools.partial(add_canvas_demo_arguments, demo=DEMO)
