"""Quantizable YOLOv3u, YOLOv5u, YOLOv8 and YOLO11 (ultralytics), INT8 with SiLU kept.

The models are ultralytics' own ``DetectionModel`` built from the configs it ships
(``ultralytics/cfg/models/v3``, ``v5``, ``v8``, ``11``), so ultralytics checkpoints load unchanged.
Every Conv is conv-bn fused with its SiLU as ``x * sigmoid(x)`` (a quantized sigmoid and multiply,
``qz_core.QuantizableSiLU``); bottleneck adds, the C2f/C3k2/C2PSA splits and concats run on INT8
tensors (adds and concats through ``FloatFunctional``); the SPPF max pools and the neck's nearest
upsampling run on INT8 tensors; the Detect head's convs are INT8. After a DeQuantStub the head's
post-processing stays in float: the DFL integral, anchors, box decoding (``dist2bbox``), the score
sigmoid and the concat of boxes and scores. YOLO11's attention keeps one float island per attention
block, its softmax(q^T k) product (``qz_detection.models.yolo_blocks`` says why); v3, v5 and v8 have
none. Unquantized, a model computes exactly what ultralytics' computes on the same weights.

ultralytics' v5 configs are the anchor-free "YOLOv5u" (the YOLOv8 Detect head with DFL), and its
v3 configs use that head too: these are the models ultralytics trains and ships as
``yolov5nu.pt``...``yolov3u.pt``, not the anchor-based originals.

ultralytics is imported on the first build (``qz_detection.models.yolo_model``), not when the
variants are registered here.

Outputs follow ultralytics: in eval, ``(predictions, raw)`` with ``predictions`` of shape
(B, 4 + num_classes, anchors) holding xywh boxes in input pixels and class probabilities, and
``raw = {"boxes", "scores", "feats"}``; with ``export=True`` only ``predictions``; in training
``raw``. NMS is not part of the model (as in ultralytics): run
``ultralytics.utils.nms.non_max_suppression(predictions, conf_thres, iou_thres)``, or
``torchvision.ops.batched_nms`` on the boxes converted to xyxy, on the FP32 or INT8 output alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qz_core import BuildContext, LoadedWeights, ModelSpec, QzError, define_model, read_checkpoint
from qz_detection.transforms import LetterBox

__all__ = [  # noqa: F822 - QuantizableYOLO and yolo_detection_loss come from __getattr__
    "QuantizableYOLO",
    "read_yolo_checkpoint",
    "yolo_detection_loss",
    "yolov3u",
    "yolov3_sppu",
    "yolov3_tinyu",
    "yolov5nu",
    "yolov5su",
    "yolov5mu",
    "yolov5lu",
    "yolov5xu",
    "yolov8n",
    "yolov8s",
    "yolov8m",
    "yolov8l",
    "yolov8x",
    "yolo11n",
    "yolo11s",
    "yolo11m",
    "yolo11l",
    "yolo11x",
]

YOLO_INPUT_SIZE = (640, 640)
_LAZY = ("QuantizableYOLO", "YoloPredictions", "yolo_detection_loss")


def __getattr__(name: str) -> Any:
    """The ultralytics-dependent names, imported on first use (PEP 562)."""
    if name in _LAZY:
        from qz_detection.models import yolo_model

        return getattr(yolo_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_yolo_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads YOLO weights from a plain state dict file or an ultralytics ``.pt`` checkpoint.

    An ultralytics checkpoint is a dict whose ``"model"`` (and ``"ema"``) holds a pickled
    ``DetectionModel``. qz reads it through ultralytics' ``torch_safe_load(safe_only=True)``:
    ``torch.load(weights_only=True)`` against ultralytics' allow-list of its own and torch's
    classes, so no arbitrary code runs. A checkpoint that pickles other classes is refused; if you
    trust it, convert it yourself:
    ``torch.save(torch.load(p, weights_only=False)["model"].float().state_dict(), "yolo_state.pt")``
    (``weights_only=False`` runs the file's pickled code: only for files you trust).

    Returns:
        The float state dict, and metadata read from an ultralytics checkpoint (``num_classes``,
        ``names`` as a list; empty for a plain state dict).

    Raises:
        QzError: the file holds neither a state dict nor a loadable ultralytics checkpoint.
    """
    path = Path(path)
    try:
        return dict(read_checkpoint(path)), {}
    except QzError as plain_error:
        if path.suffix != ".pt":
            raise
        error = plain_error
    from qz_detection.models.yolo_model import read_ultralytics_checkpoint

    try:
        return read_ultralytics_checkpoint(path)
    except QzError as exc:
        raise QzError(f"{exc} (As a state dict: {error})") from exc


def read_yolo_weights(context: BuildContext) -> LoadedWeights:
    """The YOLO specs' ``read_weights`` hook: ``num_classes`` and ``class_names`` from an ultralytics checkpoint."""
    assert context.source is not None and context.source.path is not None
    state, meta = read_yolo_checkpoint(context.source.path)
    kwargs = {"num_classes": meta["num_classes"]} if "num_classes" in meta else {}
    attributes = {"class_names": meta["names"]} if "names" in meta else {}
    return LoadedWeights(state, model_kwargs=kwargs, attributes=attributes)


def make_yolo(**kwargs: Any) -> nn.Module:
    """``QuantizableYOLO(**kwargs)``, importing ultralytics on the first build."""
    from qz_detection.models.yolo_model import QuantizableYOLO

    return QuantizableYOLO(**kwargs)


def letterbox_640() -> LetterBox:
    """YOLO's input transform: letterboxed to 640 x 640."""
    return LetterBox(YOLO_INPUT_SIZE[0])


_BASE = ModelSpec(
    name="yolov5nu",
    task="detection",
    family="yolo",
    make_model=make_yolo,
    input_size=YOLO_INPUT_SIZE,
    fixed_kwargs={"cfg": "yolov5n.yaml"},
    read_weights=read_yolo_weights,
    preprocess=letterbox_640,
    deployed_ratio_target=0.4,
    probe_kwargs={"export": True},  # probe (and export) the deployable output: predictions only
    description="YOLOv5u nano (ultralytics yolov5n.yaml; weights: a state dict or an ultralytics .pt)",
)


def _spec(name: str, cfg: str, description: str) -> ModelSpec:
    return _BASE.variant(name=name, fixed_kwargs={"cfg": cfg}, description=f"{description} (ultralytics {cfg})")


yolov3u = define_model(_spec("yolov3u", "yolov3.yaml", "YOLOv3u"))
yolov3_sppu = define_model(_spec("yolov3_sppu", "yolov3-spp.yaml", "YOLOv3u-SPP"))
yolov3_tinyu = define_model(_spec("yolov3_tinyu", "yolov3-tiny.yaml", "YOLOv3u-tiny"))
# The scale letter in the file name picks depth, width and max channels from yolov5.yaml's `scales`.
yolov5nu = define_model(_BASE)
yolov5su = define_model(_spec("yolov5su", "yolov5s.yaml", "YOLOv5u small"))
yolov5mu = define_model(_spec("yolov5mu", "yolov5m.yaml", "YOLOv5u medium"))
yolov5lu = define_model(_spec("yolov5lu", "yolov5l.yaml", "YOLOv5u large"))
yolov5xu = define_model(_spec("yolov5xu", "yolov5x.yaml", "YOLOv5u extra large"))
yolov8n = define_model(_spec("yolov8n", "yolov8n.yaml", "YOLOv8 nano"))
yolov8s = define_model(_spec("yolov8s", "yolov8s.yaml", "YOLOv8 small"))
yolov8m = define_model(_spec("yolov8m", "yolov8m.yaml", "YOLOv8 medium"))
yolov8l = define_model(_spec("yolov8l", "yolov8l.yaml", "YOLOv8 large"))
yolov8x = define_model(_spec("yolov8x", "yolov8x.yaml", "YOLOv8 extra large"))
yolo11n = define_model(_spec("yolo11n", "yolo11n.yaml", "YOLO11 nano"))
yolo11s = define_model(_spec("yolo11s", "yolo11s.yaml", "YOLO11 small"))
yolo11m = define_model(_spec("yolo11m", "yolo11m.yaml", "YOLO11 medium"))
yolo11l = define_model(_spec("yolo11l", "yolo11l.yaml", "YOLO11 large"))
yolo11x = define_model(_spec("yolo11x", "yolo11x.yaml", "YOLO11 extra large"))
