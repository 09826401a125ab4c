"""``qz demo detection``: FP32 vs INT8 PTQ vs INT8 QAT YOLOv5nu on canvases of real handwritten digits.

scikit-learn's 8x8 digits are upsampled onto 128x128 photo crops (``qz_classification.digits_canvas``),
each boxed tightly around its stroke pixels (10 classes). qz's ``yolov5nu`` (ultralytics' anchor-free
YOLOv5u) trains from scratch in FP32 at 128 px, then ``qz_core.job.quantize_model`` makes the INT8
models by PTQ and by QAT, and the table compares COCO box mAP@[.5:.95] (pycocotools), size and
batch-1 latency on canvases of held-out digit images.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

from PIL import Image
from torch import nn

from qz_classification.canvas_demo import CanvasDemo, DemoResult, add_canvas_demo_arguments, run_canvas_demo
from qz_classification.digits_canvas import NUM_DIGITS
from qz_core import ModelSpec, Task
from qz_core.task import Transform

__all__ = ["DEMO", "DemoResult", "add_demo_arguments", "box_map", "run_demo"]

# ultralytics' validation settings: keep low-score boxes, as mAP needs the whole precision-recall curve.
EVAL_NMS = {"conf_thres": 0.001, "iou_thres": 0.7, "max_det": 100}
STRIDE = 32


def _letterbox(size: int) -> Transform:
    from qz_detection.transforms import LetterBox

    return LetterBox(size)


def _coco_results(model: nn.Module, task: Task, folder: Path, coco, transform: Transform) -> list[dict]:
    results = []
    for image_id, info in coco.imgs.items():
        with Image.open(folder / "images" / info["file_name"]) as image:
            detection = task.predict(model, [image.convert("RGB")], transform)[0]
        for box, label, score in zip(
            detection["boxes"].tolist(), detection["labels"].tolist(), detection["scores"].tolist(), strict=True
        ):
            x0, y0, x1, y1 = box
            bbox = [x0, y0, x1 - x0, y1 - y0]
            results.append({"image_id": image_id, "category_id": int(label) + 1, "bbox": bbox, "score": score})
    return results


def box_map(model: nn.Module, task: Task, spec: ModelSpec, folder: Path, transform: Transform) -> float:
    """COCO box mAP@[.5:.95] in [0, 1] of ``model`` on ``folder``'s ``annotations.json`` (pycocotools).

    Labels k are category k + 1, as the canvases' COCO and YOLO files say. The NMS keeps low-score
    boxes (``EVAL_NMS``) while scoring, as ultralytics' validation does.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    saved = {key: getattr(model, key) for key in EVAL_NMS if hasattr(model, key)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(folder / "annotations.json"))
        try:
            for key, value in EVAL_NMS.items():
                setattr(model, key, value)
            results = _coco_results(model, task, folder, coco, transform)
        finally:
            for key in EVAL_NMS:
                if key in saved:
                    setattr(model, key, saved[key])
                else:
                    delattr(model, key)
        if not results:
            return 0.0
        scores = COCOeval(coco, coco.loadRes(results), "bbox")
        scores.evaluate()
        scores.accumulate()
        scores.summarize()
    return float(max(scores.stats[0], 0.0))


DEMO = CanvasDemo(
    task="detection",
    model="yolov5nu",
    metric="box mAP",
    num_classes=NUM_DIGITS,
    evaluate=box_map,
    epochs=12,
    qat_epochs=1,
    lr=2e-3,
    qat_lr=1e-4,
    batch_size=8,
    num_train=600,
    preprocess=_letterbox,
    stride=STRIDE,
)


run_demo = functools.partial(run_canvas_demo, DEMO)
add_demo_arguments = functools.partial(add_canvas_demo_arguments, demo=DEMO)
