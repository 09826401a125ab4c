"""Quantizable YOLOv3 and YOLOv5 (ultralytics), the whole network INT8 with SiLU kept.

The models are ultralytics' own ``DetectionModel`` built from the configs it ships
(``ultralytics/cfg/models/v3``, ``v5``), so ultralytics checkpoints load unchanged. Every Conv is
conv-bn fused with its SiLU as ``x * sigmoid(x)`` (a quantized sigmoid and multiply,
``qz_core.QuantizableSiLU``); bottleneck adds and concats run through ``FloatFunctional``; the SPPF
max pools and the neck's nearest upsampling run on INT8 tensors; the Detect head's convs are INT8.
After a DeQuantStub the head's post-processing stays in float: the DFL integral, anchors, box
decoding (``dist2bbox``), the score sigmoid and the concat of boxes and scores. Unquantized, a
model computes exactly what ultralytics' computes on the same weights.

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
    "yolov3",
    "yolov3_spp",
    "yolov3_tiny",
    "yolov5n",
    "yolov5s",
    "yolov5m",
    "yolov5l",
    "yolov5x",
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
    name="yolov5n",
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


yolov3 = define_model(_spec("yolov3", "yolov3.yaml", "YOLOv3u"))
yolov3_spp = define_model(_spec("yolov3_spp", "yolov3-spp.yaml", "YOLOv3u-SPP"))
yolov3_tiny = define_model(_spec("yolov3_tiny", "yolov3-tiny.yaml", "YOLOv3u-tiny"))
# The scale letter in the file name picks depth, width and max channels from yolov5.yaml's `scales`.
yolov5n = define_model(_BASE)
yolov5s = define_model(_spec("yolov5s", "yolov5s.yaml", "YOLOv5u small"))
yolov5m = define_model(_spec("yolov5m", "yolov5m.yaml", "YOLOv5u medium"))
yolov5l = define_model(_spec("yolov5l", "yolov5l.yaml", "YOLOv5u large"))
yolov5x = define_model(_spec("yolov5x", "yolov5x.yaml", "YOLOv5u extra large"))
