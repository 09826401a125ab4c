"""The original anchor-based YOLOv5 (release v7.0) n/s/m/l/x, quantizable; its checkpoints read without their code.

The network is the one of YOLOv5's ``models/yolov5{n,s,m,l,x}.yaml``: its backbone and neck are built by
ultralytics' ``parse_model`` from the same rows (ultralytics' Conv, C3, SPPF and Concat compute what
YOLOv5's do, with the same state-dict keys) and made quantizable as qz's ultralytics YOLOs are
(``qz_detection.models.yolo_blocks``: INT8 throughout, SiLU as a quantized sigmoid and multiply). The
head is ``qz_detection.models.anchor_yolo.AnchorDetect``: three 1x1 convs in INT8, then float decoding
with the anchors ``[10,13, 16,30, 33,23]``, ``[30,61, 62,45, 59,119]``, ``[116,90, 156,198, 373,326]``
at strides 8, 16 and 32. Unquantized, a model computes exactly what YOLOv5's ``DetectionModel`` computes
on the same weights.

Outputs: in eval ``(predictions, raw)``, ``predictions`` (B, 4 + classes, anchors) holding xywh boxes in
input pixels and objectness x class probability (YOLOv5's NMS score, in the layout ultralytics' NMS and
qz's YOLO evaluation take); ``raw["decoded"]`` is YOLOv5's own (B, anchors, 5 + classes) output. With
``export=True`` only ``predictions``; in training the raw levels that ``AnchorYoloLoss`` takes.

Original checkpoints (``yolov5s.pt``, a train.py ``best.pt``) pickle YOLOv5's classes
(``models.yolo.DetectionModel``, ``models.common.C3``, ...). ``read_yolov5_checkpoint`` reads them
with a restricted unpickler: those classes become inert records whose tensors are collected; no
YOLOv5 code is imported or run, and any other global the pickle names is an error.
"""

from __future__ import annotations

import builtins
import codecs
import os
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.ao.quantization import QuantStub

from qz_core import (
    BuildContext,
    LoadedWeights,
    ModelSpec,
    QzError,
    define_model,
    fuse_modules,
    read_checkpoint,
    replace_silu,
)
from qz_core.errors import unreadable_file
from qz_core.fusion import check_fuse_level
from qz_detection.models.anchor_yolo import AnchorDetect, AnchorYoloDetector, YoloV5Decoding
from qz_detection.models.yolo import YOLO_INPUT_SIZE, letterbox_640

__all__ = [
    "QuantizableYOLOv5",
    "read_yolov5_checkpoint",
    "yolov5n",
    "yolov5s",
    "yolov5m",
    "yolov5l",
    "yolov5x",
]

# (depth_multiple, width_multiple) of models/yolov5{n,s,m,l,x}.yaml.
SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8, 16, 32)
BACKBONE = (
    (-1, 1, "Conv", (64, 6, 2, 2)),
    (-1, 1, "Conv", (128, 3, 2)),
    (-1, 3, "C3", (128,)),
    (-1, 1, "Conv", (256, 3, 2)),
    (-1, 6, "C3", (256,)),
    (-1, 1, "Conv", (512, 3, 2)),
    (-1, 9, "C3", (512,)),
    (-1, 1, "Conv", (1024, 3, 2)),
    (-1, 3, "C3", (1024,)),
    (-1, 1, "SPPF", (1024, 5)),
)
NECK = (
    (-1, 1, "Conv", (512, 1, 1)),
    (-1, 1, "nn.Upsample", (None, 2, "nearest")),
    ((-1, 6), 1, "Concat", (1,)),
    (-1, 3, "C3", (512, False)),
    (-1, 1, "Conv", (256, 1, 1)),
    (-1, 1, "nn.Upsample", (None, 2, "nearest")),
    ((-1, 4), 1, "Concat", (1,)),
    (-1, 3, "C3", (256, False)),
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 14), 1, "Concat", (1,)),
    (-1, 3, "C3", (512, False)),
    (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 10), 1, "Concat", (1,)),
    (-1, 3, "C3", (1024, False)),
)
DETECT_FROM = (17, 20, 23)


def _rows(rows: tuple) -> list[list[Any]]:
    """yaml-like rows for ``parse_model``, as fresh lists (it rewrites them)."""
    return [[list(f) if isinstance(f, tuple) else f, n, m, list(args)] for f, n, m, args in rows]


def _backbone_and_neck(scale: str, in_channels: int) -> tuple[nn.Sequential, list[int]]:
    """Layers 0-23 of yolov5{scale}.yaml, made quantizable, and the indices whose outputs later layers read."""
    from qz_detection._ultralytics import import_ultralytics
    from qz_detection.models.yolo_blocks import swap_blocks

    parse_model = import_ultralytics("ultralytics.nn.tasks").parse_model
    depth, width = SCALES[scale]
    spec = {"depth_multiple": depth, "width_multiple": width, "backbone": _rows(BACKBONE), "head": _rows(NECK)}
    layers, save = parse_model(spec, in_channels, verbose=False)
    swap_blocks(layers)
    return layers, save


class QuantizableYOLOv5(AnchorYoloDetector, nn.Module):
    """The original anchor-based YOLOv5 (release v7.0), quantizable; keys as in YOLOv5's checkpoints.

    Args:
        scale: ``"n"``, ``"s"``, ``"m"``, ``"l"`` or ``"x"`` (depth and width of yolov5{scale}.yaml).
        num_classes: number of classes of the Detect head.
        in_channels: input image channels.
        export: return only the decoded predictions in eval.
    """

    def __init__(self, scale: str = "n", num_classes: int = 80, in_channels: int = 3, export: bool = False) -> None:
        super().__init__()
        if scale not in SCALES:
            raise QzError(f"YOLOv5 scale {scale!r} is not one of {', '.join(SCALES)}.")
        layers, save = _backbone_and_neck(scale, in_channels)
        channels = [layers[i].cv3.conv.out_channels for i in DETECT_FROM]
        head = AnchorDetect(num_classes, ANCHORS, channels, STRIDES, YoloV5Decoding())
        head.i, head.f, head.type = len(layers), list(DETECT_FROM), "Detect"
        self.model = nn.Sequential(*layers, head)
        self.save = sorted({*save, *DETECT_FROM})
        for module in self.modules():
            if type(module) is nn.BatchNorm2d:  # YOLOv5's initialize_weights
                module.eps, module.momentum = 1e-3, 0.03
        head.initialize_biases()
        replace_silu(self)
        self.quant = QuantStub()
        head.export = export
        self.eval()

    @property
    def stride(self) -> Tensor:
        """The strides of the detection levels (8, 16, 32)."""
        return self.head.stride

    def forward(self, x: Tensor) -> Any:
        x = self.quant(x)
        outputs: list[Any] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Fuses conv-bn of every Conv ('all') or of those inside the C3 and SPPF blocks ('blocks')."""
        from qz_detection.models.yolo_blocks import FUSE_SCOPES, conv_bn_groups

        if check_fuse_level(level) == "none":
            return
        fuse_modules(self, conv_bn_groups(self, None if level == "all" else FUSE_SCOPES), is_qat)


class PickledObject:
    """An inert stand-in for an object of a class a checkpoint's pickle names: it keeps the pickled state only."""

    qualified_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        record = super().__new__(cls)
        record.args, record.state = args, {}
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"state": state}

    def __repr__(self) -> str:
        return f"<pickled {self.qualified_name}>"


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that qz does not load."""


_YOLOV5_NAMESPACES = ("models.", "yolov5.models.")
_RECORDED_NAMESPACES = (*_YOLOV5_NAMESPACES, "torch.nn.modules.")
_BUILTINS = frozenset({"set", "frozenset", "tuple", "list", "dict", "int", "float", "bool", "str", "bytes", "complex"})
_NUMPY = {"scalar", "_reconstruct", "ndarray", "dtype"}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 pickles bytes (numpy arrays)
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
_RECORD_TYPES: dict[str, type[PickledObject]] = {}


def _record_type(qualified_name: str) -> type[PickledObject]:
    if qualified_name not in _RECORD_TYPES:
        _RECORD_TYPES[qualified_name] = type("PickledObject", (PickledObject,), {"qualified_name": qualified_name})
    return _RECORD_TYPES[qualified_name]


def _numpy_global(module: str, name: str) -> Any:
    if module == "numpy" and name in ("dtype", "ndarray"):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        return getattr(np._core.multiarray, name)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only plain data globals; YOLOv5's and torch.nn's classes become ``PickledObject`` records.

    Nothing the pickle names is imported: an unknown global raises ``UnsafePickleError`` naming it.
    """

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2's name
        qualified = f"{module}.{name}"
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        numpy_global = _numpy_global(module, name) if name in _NUMPY else None
        if numpy_global is not None:
            return numpy_global
        if qualified.startswith(_RECORDED_NAMESPACES) and all(part.isidentifier() for part in qualified.split(".")):
            return _record_type(qualified)
        raise UnsafePickleError(f"the pickle names {qualified}, which is not YOLOv5 model data")


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="qz_restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load(),
)


def _module_tensors(record: PickledObject, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a pickled ``nn.Module`` record: its parameters, persistent buffers and children's."""
    state = record.state
    skipped = state.get("_non_persistent_buffers_set") or set()
    tensors = {prefix + k: v for k, v in (state.get("_parameters") or {}).items() if isinstance(v, Tensor)}
    buffers = (state.get("_buffers") or {}).items()
    tensors |= {prefix + k: v for k, v in buffers if isinstance(v, Tensor) and k not in skipped}
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            tensors |= _module_tensors(child, f"{prefix}{name}.")
    return tensors


def _class_names(names: Any) -> list[str] | None:
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


def _scale_of(architecture: Any) -> str | None:
    """The scale letter of a YOLOv5 model yaml dict (None without one).

    Raises:
        QzError: its depth and width multiples are not those of yolov5n/s/m/l/x.
    """
    if not isinstance(architecture, Mapping):
        return None
    multiples = (architecture.get("depth_multiple", 1.0), architecture.get("width_multiple"))
    if not all(isinstance(m, (int, float)) for m in multiples):
        return None
    for scale, known in SCALES.items():
        if multiples == known:
            return scale
    raise QzError(f"YOLOv5 depth/width multiples {multiples} are none of yolov5n/s/m/l/x's: {SCALES}.")


def _checkpoint_meta(model: PickledObject) -> dict[str, Any]:
    """``scale``, ``num_classes`` and ``names`` of a pickled YOLOv5 ``DetectionModel`` record (those it has)."""
    state = model.state
    meta: dict[str, Any] = {}
    scale = _scale_of(state.get("yaml"))
    if scale is not None:
        meta["scale"] = scale
    layers = (state.get("_modules") or {}).get("model")
    head_modules = getattr(layers, "state", {}).get("_modules") or {}
    head = list(head_modules.values())[-1] if head_modules else None
    num_classes = getattr(head, "state", {}).get("nc", state.get("nc"))
    if isinstance(num_classes, int):
        meta["num_classes"] = num_classes
    names = _class_names(state.get("names"))
    if names is not None:
        meta["names"] = names
    return meta


def _load_restricted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except UnsafePickleError as exc:
        raise QzError(f"Refusing YOLOv5 checkpoint {str(path)!r}: {exc}. Nothing in it was run.") from None
    except Exception as exc:  # noqa: BLE001 - zip, pickle and tensor errors all mean 'damaged or not a checkpoint'
        raise unreadable_file("YOLOv5 checkpoint", path, exc) from None


def read_original_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float state dict and metadata of an original YOLOv5 checkpoint, read without running its code.

    Raises:
        QzError: the file is damaged, names a global outside YOLOv5's model classes, torch's tensors and
            plain data, or holds no model under ``"ema"`` or ``"model"``.
    """
    path = Path(path)
    checkpoint = _load_restricted(path)
    model = None
    if isinstance(checkpoint, Mapping):
        model = checkpoint.get("ema") or checkpoint.get("model")
    if not isinstance(model, PickledObject) or not model.qualified_name.startswith(_YOLOV5_NAMESPACES):
        raise QzError(f"YOLOv5 checkpoint {str(path)!r} holds no YOLOv5 model under 'ema' or 'model'.")
    tensors = _module_tensors(model)
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in tensors.items()}
    return state, _checkpoint_meta(model)


def read_yolov5_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """YOLOv5 weights from a plain state dict file or an original YOLOv5 ``.pt`` checkpoint.

    Returns:
        The float state dict, and what an original checkpoint says of its model (``scale``,
        ``num_classes``, ``names``; empty for a plain state dict).

    Raises:
        QzError: the file holds neither (``read_original_checkpoint`` says why).
    """
    try:
        return dict(read_checkpoint(path)), {}
    except QzError:
        return read_original_checkpoint(path)


def read_yolov5_weights(context: BuildContext) -> LoadedWeights:
    """The YOLOv5 specs' ``read_weights`` hook: scale, class count and names from an original checkpoint."""
    assert context.source is not None and context.source.path is not None
    state, meta = read_yolov5_checkpoint(context.source.path)
    kwargs = {key: meta[key] for key in ("scale", "num_classes") if key in meta}
    attributes = {"class_names": meta["names"]} if "names" in meta else {}
    return LoadedWeights(state, model_kwargs=kwargs, attributes=attributes)


def make_yolov5(**kwargs: Any) -> nn.Module:
    """``QuantizableYOLOv5(**kwargs)`` (ultralytics is imported on the first build)."""
    return QuantizableYOLOv5(**kwargs)


_BASE = ModelSpec(
    name="yolov5n",
    task="detection",
    family="yolo",
    make_model=make_yolov5,
    input_size=YOLO_INPUT_SIZE,
    fixed_kwargs={"scale": "n"},
    read_weights=read_yolov5_weights,
    preprocess=letterbox_640,
    deployed_ratio_target=0.4,
    probe_kwargs={"export": True},
    description="YOLOv5 nano, anchor-based (release v7.0 yolov5n.yaml; weights: a state dict or an original .pt)",
)


def _spec(scale: str, size: str) -> ModelSpec:
    description = (
        f"YOLOv5 {size}, anchor-based (release v7.0 yolov5{scale}.yaml; weights: a state dict or an original .pt)"
    )
    return _BASE.variant(name=f"yolov5{scale}", fixed_kwargs={"scale": scale}, description=description)


yolov5n = define_model(_BASE)
yolov5s = define_model(_spec("s", "small"))
yolov5m = define_model(_spec("m", "medium"))
yolov5l = define_model(_spec("l", "large"))
yolov5x = define_model(_spec("x", "extra large"))
