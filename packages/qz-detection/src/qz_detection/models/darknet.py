"""darknet ``.cfg`` networks and ``.weights`` files: the parser, the reader and writer, and the float model.

``parse_cfg`` reads darknet's INI-like format into ``DarknetBlock``s; ``DarknetYOLO`` builds the
float network from them, one module per darknet layer (``layers.{i}`` is darknet's layer ``i``), so
a user's cfg with other classes or anchors builds as qz's own ``yolov4.cfg`` does. Supported layers:
``[convolutional]`` (mish, leaky, relu, logistic, linear), ``[route]`` (with ``groups``/``group_id``),
``[shortcut]``, ``[maxpool]``, ``[upsample]`` and ``[yolo]``.

A ``.weights`` file is darknet's: three int32 (major, minor, revision), then ``seen`` as int64 when
``major * 10 + minor >= 2`` (int32 before), then float32 per ``[convolutional]`` layer in cfg order:
with ``batch_normalize`` the BatchNorm bias, weight, running mean and running variance, then the conv
weights; without it the conv bias, then the conv weights. ``darknet_state_dict`` splits the floats
layer by layer and refuses a file whose size does not match the network, naming the layer.

The shipped ``YOLOV4_CFG`` and ``YOLOV4_TINY_CFG`` (``darknet_cfgs``) are AlexeyAB's ``yolov4.cfg`` and
``yolov4-tiny.cfg``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from qz_core import QzError
from qz_detection.models.darknet_cfgs import BUILTIN_CFGS, YOLOV4_CFG, YOLOV4_TINY_CFG

__all__ = [
    "BUILTIN_CFGS",
    "DARKNET_FLOATS",
    "DarknetBlock",
    "DarknetHeader",
    "DarknetWeights",
    "DarknetYOLO",
    "YOLOV4_CFG",
    "YOLOV4_TINY_CFG",
    "darknet_state_dict",
    "parse_cfg",
    "read_cfg",
    "read_darknet_weights",
    "write_darknet_weights",
]

DARKNET_FLOATS = "darknet.weights"  # the key under which a .weights file's floats wait for match_checkpoint
LEAKY_SLOPE = 0.1  # darknet's leaky activation
BN_EPS = 1e-5  # darknet's cuDNN BatchNorm epsilon
HEADER_INT32 = 3


@dataclass
class DarknetBlock:
    """One cfg section: its kind (``convolutional``, ``route``...), its options as text, its first line."""

    kind: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0

    def get_int(self, key: str, default: int | None = None) -> int:
        """Option ``key`` as an int (``default`` when absent).

        Raises:
            QzError: the option is absent without a default, or is not an integer.
        """
        return int(self._number(key, default, int))

    def get_float(self, key: str, default: float | None = None) -> float:
        """Option ``key`` as a float (``default`` when absent)."""
        return float(self._number(key, default, float))

    def get_ints(self, key: str) -> list[int]:
        """Option ``key`` as a comma-separated list of ints."""
        text = self.options.get(key, "")
        try:
            return [int(float(v)) for v in text.split(",") if v.strip()]
        except ValueError:
            raise QzError(
                f"darknet cfg line {self.line} [{self.kind}]: {key}={text!r} is not a list of numbers."
            ) from None

    def _number(self, key: str, default: float | None, kind: type) -> float:
        if key not in self.options:
            if default is None:
                raise QzError(f"darknet cfg line {self.line} [{self.kind}] has no {key}=.")
            return default
        try:
            return kind(float(self.options[key])) if kind is int else kind(self.options[key])
        except ValueError:
            raise QzError(
                f"darknet cfg line {self.line} [{self.kind}]: {key}={self.options[key]!r} is not a number."
            ) from None


def parse_cfg(text: str) -> list[DarknetBlock]:
    """darknet cfg text -> its sections, ``[net]`` first (comments and blank lines skipped).

    Raises:
        QzError: a line outside any section, a line without ``=``, or no ``[net]`` section first.
    """
    blocks: list[DarknetBlock] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            blocks.append(DarknetBlock(line.strip("[]").strip().lower(), {}, number))
        elif "=" not in line or not blocks:
            raise QzError(f"darknet cfg line {number}: expected '[section]' or 'key=value', got {line!r}.")
        else:
            key, value = line.split("=", 1)
            blocks[-1].options[key.strip()] = value.strip()
    if not blocks or blocks[0].kind not in ("net", "network"):
        raise QzError("A darknet cfg starts with a [net] section.")
    return blocks


def read_cfg(cfg: str | os.PathLike) -> list[DarknetBlock]:
    """Parses a shipped cfg (``"yolov4.cfg"``, ``"yolov4-tiny.cfg"``), a cfg file, or cfg text.

    Raises:
        QzError: neither a shipped name, an existing file nor cfg text.
    """
    text = os.fspath(cfg)
    if text in BUILTIN_CFGS:
        return parse_cfg(BUILTIN_CFGS[text])
    if "[" in text and "\n" in text:
        return parse_cfg(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise QzError(f"darknet cfg {text!r} is neither one of {', '.join(BUILTIN_CFGS)} nor an existing file.")
    return parse_cfg(path.read_text())


# --- The float network -------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """A ``[convolutional]`` layer: conv, BatchNorm when ``batch_normalize``, then its activation."""

    def __init__(self, block: DarknetBlock, in_channels: int) -> None:
        super().__init__()
        size, batch_normalize = block.get_int("size", 1), bool(block.get_int("batch_normalize", 0))
        padding = size // 2 if block.get_int("pad", 0) else block.get_int("padding", 0)
        self.conv = nn.Conv2d(
            in_channels,
            block.get_int("filters", 1),
            size,
            block.get_int("stride", 1),
            padding,
            groups=block.get_int("groups", 1),
            bias=not batch_normalize,
        )
        self.bn = nn.BatchNorm2d(self.conv.out_channels, eps=BN_EPS) if batch_normalize else nn.Identity()
        self.act = _activation(block)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def _activation(block: DarknetBlock) -> nn.Module:
    name = block.options.get("activation", "logistic")
    activations = {
        "mish": nn.Mish,
        "leaky": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "relu": nn.ReLU,
        "logistic": nn.Sigmoid,
        "linear": nn.Identity,
    }
    if name not in activations:
        raise QzError(
            f"darknet cfg line {block.line}: activation={name!r} is not supported; "
            f"qz supports {', '.join(activations)}."
        )
    return activations[name]()


class Route(nn.Module):
    """A ``[route]``: earlier outputs (each its ``group_id``-th of ``groups`` channel slices), concatenated."""

    def __init__(self, sources: Sequence[int], groups: int = 1, group_id: int = 0) -> None:
        super().__init__()
        self.sources, self.groups, self.group_id = list(sources), groups, group_id

    def pick(self, saved: dict[int, Tensor]) -> list[Tensor]:
        """The routed tensors, sliced to their channel group."""
        picked = [saved[i] for i in self.sources]
        if self.groups == 1:
            return picked
        sliced = []
        for t in picked:
            width = t.shape[1] // self.groups
            sliced.append(t[:, self.group_id * width : (self.group_id + 1) * width])
        return sliced

    def forward(self, saved: dict[int, Tensor]) -> Tensor:
        picked = self.pick(saved)
        return picked[0] if len(picked) == 1 else torch.cat(picked, 1)


class Shortcut(nn.Module):
    """A ``[shortcut]`` (linear activation): the previous output plus an earlier one."""

    def __init__(self, source: int) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: Tensor, saved: dict[int, Tensor]) -> Tensor:
        return x + saved[self.source]


class YoloLayer(nn.Module):
    """A ``[yolo]`` layer: its anchors (input pixels), classes and ``scale_x_y``; decodes in float.

    darknet's rules: ``xy = (sigmoid(t_xy) * scale_x_y - (scale_x_y - 1) / 2 + cell) * stride``,
    ``wh = exp(t_wh) * anchor``, class score ``sigmoid(t_obj) * sigmoid(t_cls)``.
    """

    def __init__(self, block: DarknetBlock, num_classes: int | None = None) -> None:
        super().__init__()
        anchors = torch.tensor(block.get_ints("anchors"), dtype=torch.float32).view(-1, 2)
        mask = block.get_ints("mask") or list(range(len(anchors)))
        if block.get_int("new_coords", 0):
            raise QzError(f"darknet cfg line {block.line}: [yolo] new_coords=1 (Scaled-YOLOv4) is not supported.")
        self.classes = num_classes if num_classes is not None else block.get_int("classes", 80)
        self.scale_x_y = block.get_float("scale_x_y", 1.0)
        self.register_buffer("anchors", anchors[mask], persistent=False)

    @property
    def num_anchors(self) -> int:
        """Anchors per cell."""
        return len(self.anchors)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def split(self, raw: Tensor) -> Tensor:
        """(B, A * (5 + C), H, W) -> (B, A, H, W, 5 + C)."""
        b, _, h, w = raw.shape
        return raw.view(b, self.num_anchors, 5 + self.classes, h, w).permute(0, 1, 3, 4, 2)

    def boxes(self, t_xy: Tensor, t_wh: Tensor, cells: Tensor, stride: Tensor, anchors: Tensor) -> Tensor:
        """Centre and size in input pixels (..., 4) from the raw ``t_xy``, ``t_wh`` of the given cells/anchors."""
        xy = (t_xy.sigmoid() * self.scale_x_y - (self.scale_x_y - 1) / 2 + cells) * stride
        return torch.cat([xy, t_wh.exp() * anchors], -1)

    def decode(self, raw: Tensor, input_size: tuple[int, int]) -> Tensor:
        """(B, 4 + C, A * H * W): xywh boxes in input pixels, then class scores (objectness times class)."""
        p = self.split(raw)
        b, a, h, w, _ = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, dtype=p.dtype), torch.arange(w, dtype=p.dtype), indexing="ij")
        cells = torch.stack([gx, gy], -1)
        stride = torch.tensor([input_size[1] / w, input_size[0] / h], dtype=p.dtype)
        boxes = self.boxes(p[..., 0:2], p[..., 2:4], cells, stride, self.anchors.view(1, a, 1, 1, 2))
        scores = p[..., 5:].sigmoid() * p[..., 4:5].sigmoid()
        return torch.cat([boxes, scores], -1).reshape(b, a * h * w, 4 + self.classes).transpose(1, 2)


class DarknetYOLO(nn.Module):
    """A darknet YOLO built from its cfg: ``layers.{i}`` is darknet's layer ``i``; float decoding after.

    Args:
        cfg: a shipped cfg name (``"yolov4.cfg"``, ``"yolov4-tiny.cfg"``), a cfg file or cfg text.
        num_classes: classes of every ``[yolo]`` layer (the head convs are resized); the cfg's when None.
        export: in eval, return only the decoded predictions.

    Outputs follow qz's YOLO convention: in eval ``(predictions, raw)`` with ``predictions`` of
    shape (B, 4 + classes, anchors) holding xywh boxes in input pixels and class scores, and ``raw``
    the ``[yolo]`` layers' inputs; with ``export=True`` only ``predictions``; in training ``raw``.

    Raises:
        QzError: a layer kind or option qz does not build (the cfg line is named).
    """

    def __init__(self, cfg: str | os.PathLike = "yolov4.cfg", num_classes: int | None = None, export: bool = False):
        super().__init__()
        self.blocks = read_cfg(cfg)
        net = self.blocks[0]
        self.input_size = (net.get_int("height", 416), net.get_int("width", 416))
        self.export = export
        layers, strides = _build_layers(self.blocks, net.get_int("channels", 3), num_classes)
        self.layers = nn.ModuleList(layers)
        self.heads = [i for i, layer in enumerate(self.layers) if isinstance(layer, YoloLayer)]
        if not self.heads:
            raise QzError("The darknet cfg has no [yolo] layer: qz builds darknet detectors.")
        self.stride = torch.tensor([float(strides[i]) for i in self.heads])
        self.num_classes = self.layers[self.heads[0]].classes
        self.kept = _kept_outputs(self.layers)
        _init_head_biases(self)

    @property
    def yolo_layers(self) -> list[YoloLayer]:
        """The ``[yolo]`` layers, in cfg order."""
        return [self.layers[i] for i in self.heads]

    def run_layers(self, x: Tensor) -> list[Tensor]:
        """Runs the network; returns the ``[yolo]`` layers' inputs (raw head maps), in cfg order."""
        saved: dict[int, Tensor] = {}
        raw = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Route):
                x = layer(saved)
            elif isinstance(layer, Shortcut):
                x = layer(x, saved)
            else:
                x = layer(x)
            if isinstance(layer, YoloLayer):
                raw.append(x)
            if i in self.kept:
                saved[i] = x
        return raw

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]] | list[Tensor]:
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        raw = self.head_maps(x)
        if self.training:
            return raw
        predictions = torch.cat([head.decode(r, input_size) for head, r in zip(self.yolo_layers, raw, strict=True)], -1)
        return predictions if self.export else (predictions, raw)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The network's input as its layers take it (the float model: unchanged)."""
        return x

    def float_raw(self, raw: list[Tensor]) -> list[Tensor]:
        """The raw head maps as float tensors (the float model: unchanged)."""
        return raw

    def head_maps(self, x: Tensor) -> list[Tensor]:
        """The ``[yolo]`` layers' inputs (raw head maps) for input ``x``, as float tensors."""
        return self.float_raw(self.run_layers(self.quantize_input(x)))

    def match_checkpoint(self, state: dict[str, Tensor]) -> None:
        """Splits a darknet ``.weights`` file's floats (``DarknetWeights``) into this network's state dict keys.

        Called by qz's strict loader before it compares keys. Raises ``QzError`` naming the layer where the
        file's size does not match this cfg.
        """
        if DARKNET_FLOATS in state:
            source = getattr(state, "source", "darknet weights")
            state.update(darknet_state_dict(self, state.pop(DARKNET_FLOATS), source))

    def conv_blocks(self) -> list[tuple[int, ConvBlock]]:
        """(darknet layer index, block) of every ``[convolutional]`` layer, in cfg order."""
        return [(i, m) for i, m in enumerate(self.layers) if isinstance(m, ConvBlock)]


def _build_layers(
    blocks: list[DarknetBlock], channels: int, num_classes: int | None
) -> tuple[list[nn.Module], list[int]]:
    """One module per darknet layer, and each layer's output channels and stride."""
    layers: list[nn.Module] = []
    out_channels: list[int] = []
    strides: list[int] = []
    body = blocks[1:]
    for i, block in enumerate(body):
        c_in = out_channels[-1] if out_channels else channels
        s_in = strides[-1] if strides else 1
        if block.kind == "convolutional":
            if num_classes is not None and i + 1 < len(body) and body[i + 1].kind == "yolo":
                block = _resized_head(block, body[i + 1], num_classes)
            layer, c_out, s_out = ConvBlock(block, c_in), block.get_int("filters", 1), s_in * block.get_int("stride", 1)
        elif block.kind == "route":
            sources = [_absolute(block, i, j) for j in block.get_ints("layers")]
            groups = block.get_int("groups", 1)
            layer = Route(sources, groups, block.get_int("group_id", 0))
            c_out, s_out = sum(out_channels[j] // groups for j in sources), strides[sources[0]]
        elif block.kind == "shortcut":
            if block.options.get("activation", "linear") != "linear":
                raise QzError(f"darknet cfg line {block.line}: [shortcut] supports activation=linear only.")
            layer, c_out, s_out = Shortcut(_absolute(block, i, block.get_int("from"))), c_in, s_in
        elif block.kind == "maxpool":
            layer, s_out = _maxpool(block), s_in * block.get_int("stride", 1)
            c_out = c_in
        elif block.kind == "upsample":
            scale = block.get_int("stride", 2)
            layer, c_out, s_out = nn.Upsample(scale_factor=scale, mode="nearest"), c_in, max(s_in // scale, 1)
        elif block.kind == "yolo":
            layer, c_out, s_out = YoloLayer(block, num_classes), c_in, s_in
            expected = layer.num_anchors * (5 + layer.classes)
            if c_in != expected:
                raise QzError(
                    f"darknet cfg line {block.line}: [yolo] with {layer.num_anchors} anchors and {layer.classes} "
                    f"classes needs {expected} channels; layer {i - 1} gives {c_in}."
                )
        else:
            raise QzError(f"darknet cfg line {block.line}: layer [{block.kind}] is not supported by qz.")
        layers.append(layer)
        out_channels.append(c_out)
        strides.append(s_out)
    return layers, strides


def _absolute(block: DarknetBlock, index: int, ref: int) -> int:
    target = index + ref if ref < 0 else ref
    if not 0 <= target < index:
        raise QzError(f"darknet cfg line {block.line}: layer {index} refers to layer {target}, not an earlier one.")
    return target


def _maxpool(block: DarknetBlock) -> nn.MaxPool2d:
    stride = block.get_int("stride", 1)
    size = block.get_int("size", stride)
    if block.get_int("padding", size - 1) != size - 1:
        raise QzError(f"darknet cfg line {block.line}: [maxpool] padding= other than size-1 is not supported.")
    if stride == 1 and size % 2 == 1:
        return nn.MaxPool2d(size, 1, size // 2)
    if size == stride:
        return nn.MaxPool2d(size, stride)
    raise QzError(
        f"darknet cfg line {block.line}: [maxpool] size={size} stride={stride} is not supported "
        "(qz builds size=stride, or stride=1 with an odd size)."
    )


def _resized_head(conv: DarknetBlock, yolo: DarknetBlock, num_classes: int) -> DarknetBlock:
    anchors = len(yolo.get_ints("mask")) or len(yolo.get_ints("anchors")) // 2
    return DarknetBlock(conv.kind, conv.options | {"filters": str(anchors * (5 + num_classes))}, conv.line)


def _kept_outputs(layers: Sequence[nn.Module]) -> set[int]:
    kept: set[int] = set()
    for layer in layers:
        if isinstance(layer, Route):
            kept.update(layer.sources)
        elif isinstance(layer, Shortcut):
            kept.add(layer.source)
    return kept


@torch.no_grad()
def _init_head_biases(model: DarknetYOLO) -> None:
    """Random-weight heads start near darknet's trained priors: objectness ~ 8 objects per 640² image."""
    for index, stride in zip(model.heads, model.stride.tolist(), strict=True):
        conv = model.layers[index - 1]
        if not isinstance(conv, ConvBlock) or conv.conv.bias is None:
            continue
        head = model.layers[index]
        bias = conv.conv.bias.view(head.num_anchors, -1)
        bias[:, 4] = float(np.log(8 / (640 / stride) ** 2))
        bias[:, 5:] = float(np.log(0.6 / max(head.classes - 0.99, 1.0)))


# --- .weights files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DarknetHeader:
    """A ``.weights`` file's header: darknet's version and the number of images it was trained on."""

    major: int = 0
    minor: int = 2
    revision: int = 5
    seen: int = 0

    @property
    def seen_is_int64(self) -> bool:
        """darknet writes ``seen`` as int64 from version 0.2 on (int32 before)."""
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def nbytes(self) -> int:
        """The header's size in bytes."""
        return 4 * HEADER_INT32 + (8 if self.seen_is_int64 else 4)


def read_darknet_weights(path: str | os.PathLike) -> tuple[DarknetHeader, Tensor]:
    """A ``.weights`` file's header and all its float32 values, flat (split them with ``darknet_state_dict``).

    Raises:
        QzError: the file is shorter than its header, or its float data is not a whole number of float32.
    """
    data = Path(path).read_bytes()
    if len(data) < 4 * HEADER_INT32:
        raise QzError(f"darknet weights {str(path)!r} is {len(data)} bytes: shorter than its header.")
    major, minor, revision = np.frombuffer(data, "<i4", HEADER_INT32).tolist()
    header = DarknetHeader(major, minor, revision)
    seen_type = "<i8" if header.seen_is_int64 else "<i4"
    if len(data) < header.nbytes:
        raise QzError(f"darknet weights {str(path)!r} is {len(data)} bytes: shorter than its header.")
    seen = int(np.frombuffer(data, seen_type, 1, 4 * HEADER_INT32)[0])
    header = DarknetHeader(major, minor, revision, seen)
    body = len(data) - header.nbytes
    if body % 4:
        raise QzError(f"darknet weights {str(path)!r}: {body} bytes after the header are not whole float32 values.")
    floats = torch.from_numpy(np.frombuffer(data, "<f4", body // 4, header.nbytes).copy())
    return header, floats


class DarknetWeights(dict):
    """A ``.weights`` file read for qz's loader: its floats under ``DARKNET_FLOATS``, split by the model.

    The split needs the network, so ``DarknetYOLO.match_checkpoint`` does it once the model is built.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.header, floats = read_darknet_weights(path)
        super().__init__({DARKNET_FLOATS: floats})
        self.source = f"darknet weights {os.fspath(path)!r}"


def _layer_tensors(block: ConvBlock) -> list[tuple[str, tuple[int, ...]]]:
    """(state dict suffix, shape) of one conv layer's tensors, in darknet's file order."""
    n = block.conv.out_channels
    order = [("bn.bias", (n,)), ("bn.weight", (n,)), ("bn.running_mean", (n,)), ("bn.running_var", (n,))]
    if block.conv.bias is not None:
        order = [("conv.bias", (n,))]
    return [*order, ("conv.weight", tuple(block.conv.weight.shape))]


def darknet_state_dict(model: DarknetYOLO, floats: Tensor, source: str = "darknet weights") -> dict[str, Tensor]:
    """Splits a ``.weights`` file's floats into ``model``'s state dict, conv layer by conv layer.

    Raises:
        QzError: the floats end inside a layer, or some are left after the last one (one line naming them).
    """
    state: dict[str, Tensor] = OrderedDict()
    offset, total = 0, len(floats)
    for index, block in model.conv_blocks():
        needed = sum(int(np.prod(shape)) for _, shape in _layer_tensors(block))
        if offset + needed > total:
            raise QzError(
                f"{source} does not match the cfg: it ends inside layer {index} (convolutional, "
                f"{block.conv.out_channels} filters), which needs {needed} floats but {total - offset} are left."
            )
        for suffix, shape in _layer_tensors(block):
            count = int(np.prod(shape))
            state[f"layers.{index}.{suffix}"] = floats[offset : offset + count].view(shape).clone()
            offset += count
        if isinstance(block.bn, nn.BatchNorm2d):
            state[f"layers.{index}.bn.num_batches_tracked"] = torch.tensor(0)
    if offset != total:
        last = model.conv_blocks()[-1][0]
        raise QzError(
            f"{source} does not match the cfg: {4 * (total - offset)} bytes ({total - offset} floats) are left "
            f"after the last convolutional layer {last}."
        )
    return state


def write_darknet_weights(model: DarknetYOLO, path: str | os.PathLike, header: DarknetHeader = DarknetHeader()) -> None:
    """Writes ``model``'s float weights as a darknet ``.weights`` file (the layout ``read_darknet_weights`` reads)."""
    state = model.state_dict()
    seen_type = "<i8" if header.seen_is_int64 else "<i4"
    parts = [np.array([header.major, header.minor, header.revision], "<i4").tobytes()]
    parts.append(np.array([header.seen], seen_type).tobytes())
    for index, block in model.conv_blocks():
        for suffix, _ in _layer_tensors(block):
            parts.append(state[f"layers.{index}.{suffix}"].detach().float().numpy().astype("<f4").tobytes())
    Path(path).write_bytes(b"".join(parts))


# --- Shipped cfgs --------------------------------------------------------------------------------
