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

Outputs follow ultralytics: in eval, ``(predictions, raw)`` with ``predictions`` of shape
(B, 4 + num_classes, anchors) holding xywh boxes in input pixels and class probabilities, and
``raw = {"boxes", "scores", "feats"}``; with ``export=True`` only ``predictions``; in training
``raw``. NMS is not part of the model (as in ultralytics): run
``ultralytics.utils.nms.non_max_suppression(predictions, conf_thres, iou_thres)``, or
``torchvision.ops.batched_nms`` on the boxes converted to xyxy, on the FP32 or INT8 output alike.
"""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics reaches for the network at import without it

from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from torch import Tensor, nn  # noqa: E402
from torch.ao.quantization import QuantStub  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from qz_core import (  # noqa: E402
    QzError,
    build_quantizable,
    fuse_modules,
    load_state_dict_strict,
    read_checkpoint,
    register_model,
    replace_silu,
    resolve_weights,
)
from qz_core.builder import WeightsArg  # noqa: E402
from qz_core.fusion import check_fuse_level  # noqa: E402
from qz_detection.models.yolo_blocks import (  # noqa: E402
    QuantizableBottleneck,
    QuantizableC3,
    QuantizableSPP,
    QuantizableSPPF,
    conv_bn_groups,
    swap_blocks,
)

__all__ = [
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
YOLO_DEPLOYED_RATIO_TARGET = 0.4


class QuantizableYOLO(DetectionModel):
    """ultralytics' ``DetectionModel`` with a QuantStub in front and quantizable blocks.

    Args:
        cfg: an ultralytics model config: a name such as ``"yolov5n.yaml"`` (the scale letter picks
            depth and width from ``yolov5.yaml``) or a config dict.
        num_classes: number of classes of the Detect head.
        in_channels: input image channels.
        export: return only the decoded predictions in eval (ultralytics' ``Detect.export``).

    Raises:
        QzError: the config uses blocks qz has no quantizable version of (YOLOv8+ blocks such as C2f).
    """

    def __init__(self, cfg: str | dict, num_classes: int = 80, in_channels: int = 3, export: bool = False) -> None:
        super().__init__(cfg, ch=in_channels, nc=num_classes, verbose=False)
        swap_blocks(self)
        replace_silu(self)
        self.quant = QuantStub()
        self.model[-1].export = export
        self.eval()

    def _predict_once(self, x: Tensor, profile: bool = False, embed: list[int] | None = None) -> Any:
        quant = self._modules.get("quant")  # absent while ultralytics' __init__ runs its stride probe
        return super()._predict_once(quant(x) if quant is not None else x, profile, embed)

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn of every Conv ('all') or of those inside the residual/CSP/SPP blocks ('blocks').

        SiLU does not fuse: it follows the fused conv as a quantized sigmoid and multiply.
        """
        if check_fuse_level(level) == "none":
            return
        scopes = None if level == "all" else (QuantizableBottleneck, QuantizableC3, QuantizableSPPF, QuantizableSPP)
        fuse_modules(self, conv_bn_groups(self, scopes), is_qat)


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
        ``names``; empty for a plain state dict).

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
    from ultralytics.nn.tasks import torch_safe_load

    try:
        checkpoint, _ = torch_safe_load(str(path), safe_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means 'not a checkpoint qz can read safely'
        raise QzError(
            f"Cannot read YOLO weights {str(path)!r}: not a state dict ({error}) and not an ultralytics "
            f"checkpoint that loads with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "See qz_detection.models.yolo.read_yolo_checkpoint for converting a trusted file."
        ) from exc
    model = checkpoint.get("ema") or checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(model, nn.Module):
        raise QzError(f"ultralytics checkpoint {str(path)!r} holds no model under 'ema' or 'model'.")
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {}
    detect = model.model[-1] if hasattr(model, "model") else None
    if detect is not None and hasattr(detect, "nc"):
        meta["num_classes"] = int(detect.nc)
    if isinstance(getattr(model, "names", None), Mapping):
        meta["names"] = dict(model.names)
    return state, meta


def _make_yolo(cfg: str, state: Mapping[str, Tensor] | None, label: str, names: Any) -> Callable[..., nn.Module]:
    def make_model(**kwargs: Any) -> QuantizableYOLO:
        model = QuantizableYOLO(cfg, **kwargs)
        if state is not None:
            load_state_dict_strict(model, state, label)
        if names is not None:
            model.names = names
        return model

    return make_model


def _yolo(
    cfg: str,
    weights: WeightsArg,
    progress: bool,
    quantize: bool,
    is_qat: bool,
    skip_fuse: bool,
    **kwargs: Any,
) -> QuantizableYOLO:
    source = resolve_weights(weights, None)
    state, label, names = None, "", None
    if source is not None:
        state, meta = read_yolo_checkpoint(source.path)
        label = source.label
        names = meta.get("names")
        if "num_classes" in meta:
            given = kwargs.setdefault("num_classes", meta["num_classes"])
            if given != meta["num_classes"]:
                raise QzError(f"num_classes={given} does not match weights {label} ({meta['num_classes']} classes).")
    return build_quantizable(
        _make_yolo(cfg, state, label, names),
        weights=None,
        weights_enum=None,
        progress=progress,
        quantize=quantize,
        is_qat=is_qat,
        skip_fuse=skip_fuse,
        **kwargs,
    )


_BUILDER_DOC = """Quantizable {name} (ultralytics ``{cfg}``).

Args:
    weights: None (random weights), or a path to a state dict file or an ultralytics ``.pt``
        checkpoint (read with weights_only=True, see ``read_yolo_checkpoint``).
    progress: unused (YOLO weights are local files); kept for the common builder signature.
    quantize: prepare for quantization (PTQ; QAT with ``is_qat``).
    is_qat: prepare for quantization-aware training.
    skip_fuse: leave fusion to the caller.
    **kwargs: ``qz_core.QuantOptions`` fields and ``QuantizableYOLO`` arguments (``num_classes``,
        ``in_channels``, ``export``).
"""


def _define(name: str, cfg: str) -> Callable[..., QuantizableYOLO]:
    """Defines and registers the public builder ``name`` for ultralytics config ``cfg``."""

    def builder(
        *,
        weights: WeightsArg = None,
        progress: bool = True,
        quantize: bool = False,
        is_qat: bool = False,
        skip_fuse: bool = False,
        **kwargs: Any,
    ) -> QuantizableYOLO:
        return _yolo(cfg, weights, progress, quantize, is_qat, skip_fuse, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = _BUILDER_DOC.format(name=name, cfg=cfg)
    return register_model(
        name,
        task="detection",
        weights=None,
        input_size=YOLO_INPUT_SIZE,
        family="yolo",
        deployed_ratio_target=YOLO_DEPLOYED_RATIO_TARGET,
        config=cfg,
        probe_build_kwargs={"export": True},  # probe (and export) the deployable output: predictions only
    )(builder)


yolov3 = _define("yolov3", "yolov3.yaml")
yolov3_spp = _define("yolov3_spp", "yolov3-spp.yaml")
yolov3_tiny = _define("yolov3_tiny", "yolov3-tiny.yaml")
# The scale letter in the file name picks depth, width and max channels from yolov5.yaml's `scales`.
yolov5n = _define("yolov5n", "yolov5n.yaml")
yolov5s = _define("yolov5s", "yolov5s.yaml")
yolov5m = _define("yolov5m", "yolov5m.yaml")
yolov5l = _define("yolov5l", "yolov5l.yaml")
yolov5x = _define("yolov5x", "yolov5x.yaml")


def yolo_detection_loss(model: nn.Module) -> Callable[[Any, Mapping[str, Tensor]], Tensor]:
    """ultralytics' YOLO detection loss (box IoU, class BCE, DFL) as ``loss_fn(outputs, targets)``.

    It fits ``qz_core.train_qat`` with batches of ``(images, targets)``, where ``targets`` is
    ultralytics' label dict: ``batch_idx`` (N,), ``cls`` (N, 1) and ``bboxes`` (N, 4) as normalized
    xywh. ``model`` gets ultralytics' default hyperparameters as ``model.args`` if it has none.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    if not hasattr(model, "args"):
        model.args = get_cfg()
    criterion = v8DetectionLoss(model)

    def loss_fn(outputs: Any, targets: Mapping[str, Tensor]) -> Tensor:
        return criterion(outputs, dict(targets))[0].sum()

    return loss_fn
