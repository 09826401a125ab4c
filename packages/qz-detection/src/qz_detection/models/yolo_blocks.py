"""Quantizable versions of the ultralytics YOLO blocks used by the YOLOv3, YOLOv5, YOLOv8 and YOLO11 configs.

Each class subclasses the ultralytics block and only routes its tensor arithmetic through
``FloatFunctional`` (residual adds, channel concats), so its parameters and state-dict keys are
the ultralytics ones (imported through ``qz_detection._ultralytics``). ``swap_blocks`` turns a
built ultralytics model into the quantizable one in place by changing each block's class: the
weights stay where they are.

Unprepared, every block computes exactly what the ultralytics block computes: ``FloatFunctional``
calls the same ``torch.add``/``torch.cat`` and ``DeQuantStub`` is the identity.

YOLO11's attention (``C2PSA`` -> ``PSABlock`` -> ``Attention``) is INT8 except its core: the qkv,
positional (depthwise) and projection convs, the residual adds and the PSABlock's feed-forward
convs are INT8, while the scaled ``q^T k``, its softmax and ``v attn^T`` run in float inside a
``qz_core.FloatIsland`` (one per attention block, counted by ``count_float_islands``). Eager-mode
``FloatFunctional.matmul`` does convert and run on x86 and qnnpack, but ``quantized::matmul`` has
no ONNX symbolic (the TorchScript exporter raises ``UnsupportedOperatorError``), so that INT8 model
would not export to ONNX, which qz's support contract requires; the island exports as
DequantizeLinear -> MatMul/Softmax -> QuantizeLinear.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from qz_core import FloatIsland, QzError
from qz_core.modules import QuantizableSiLU
from qz_detection._ultralytics import import_ultralytics

_modules = import_ultralytics("ultralytics.nn.modules")
C3, DFL, SPP, SPPF = _modules.C3, _modules.DFL, _modules.SPP, _modules.SPPF
C2f, C3k, C3k2 = _modules.C2f, _modules.block.C3k, _modules.C3k2
C2PSA, PSABlock, Attention = _modules.C2PSA, _modules.block.PSABlock, _modules.block.Attention
Bottleneck, Concat, Conv, Detect, DWConv = (
    _modules.Bottleneck,
    _modules.Concat,
    _modules.Conv,
    _modules.Detect,
    _modules.DWConv,
)

__all__ = [
    "AttentionCore",
    "QuantizableAttention",
    "QuantizableBottleneck",
    "QuantizableC2PSA",
    "QuantizableC2f",
    "QuantizableC3",
    "QuantizableC3k",
    "QuantizableC3k2",
    "QuantizableConcat",
    "QuantizableDetect",
    "QuantizableSPP",
    "QuantizablePSABlock",
    "QuantizableSPPF",
    "swap_blocks",
]


class QuantizableBottleneck(Bottleneck):
    """Bottleneck whose residual add runs through ``FloatFunctional``."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable arithmetic (an add only where the block has a shortcut)."""
        if self.add:
            self.skip_add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return self.skip_add.add(x, y) if self.add else y


class QuantizableC3(C3):
    """CSP bottleneck (C3) whose channel concat runs through ``FloatFunctional``."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat."""
        self.cat = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(self.cat.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class QuantizableC3k(QuantizableC3, C3k):
    """YOLO11's C3k (a C3 with its own kernel size): the C3 concat through ``FloatFunctional``."""


class QuantizableC2f(C2f):
    """YOLOv8's C2f: ``cv1``'s output split by slicing INT8 tensors, the concat through ``FloatFunctional``.

    Slices rather than ``chunk``: the same values, and ONNX exports a slice of an INT8 tensor
    (qz-core's ``aten::slice`` symbolic) but not a chunk of one.
    """

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat."""
        self.cat = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        y = [y[:, : self.c], y[:, self.c :]]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(self.cat.cat(y, 1))


class QuantizableC3k2(QuantizableC2f, C3k2):
    """YOLO11's C3k2 (a C2f of Bottleneck or C3k blocks), quantizable as C2f is."""


class AttentionCore(nn.Module):
    """The float part of ultralytics' ``Attention``: softmax(scaled q^T k) applied to v, per head."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        return v @ attn.transpose(-2, -1)


class QuantizableAttention(Attention):
    """YOLO11's multi-head attention: INT8 convs and add, the attention product itself in a ``FloatIsland``."""

    def init_quant_ops(self) -> None:
        """Adds the float island around the attention product and the quantizable positional add."""
        self.attend = FloatIsland(AttentionCore(self.scale))
        self.pe_add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(x).view(batch, self.num_heads, self.key_dim * 2 + self.head_dim, height * width)
        q, k, v = qkv[:, :, : self.key_dim], qkv[:, :, self.key_dim : 2 * self.key_dim], qkv[:, :, 2 * self.key_dim :]
        attended = self.attend(q, k, v).view(batch, channels, height, width)
        return self.proj(self.pe_add.add(attended, self.pe(v.reshape(batch, channels, height, width))))


class QuantizablePSABlock(PSABlock):
    """YOLO11's attention block: attention and feed-forward, each with a ``FloatFunctional`` residual add."""

    def init_quant_ops(self) -> None:
        """Adds the residual adds (where the block has a shortcut)."""
        if self.add:
            self.attn_add = FloatFunctional()
            self.ffn_add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        if not self.add:
            return self.ffn(self.attn(x))
        x = self.attn_add.add(x, self.attn(x))
        return self.ffn_add.add(x, self.ffn(x))


class QuantizableC2PSA(C2PSA):
    """YOLO11's C2PSA: INT8 slices (as in C2f), attention blocks on one half, a ``FloatFunctional`` concat."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat."""
        self.cat = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        a, b = y[:, : self.c], y[:, self.c :]
        return self.cv2(self.cat.cat([a, self.m(b)], 1))


class QuantizableSPPF(SPPF):
    """SPPF: repeated INT8 max pools, a ``FloatFunctional`` concat (and add, with a shortcut)."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat and, for a shortcut, the add."""
        self.cat = FloatFunctional()
        if getattr(self, "add", False):
            self.skip_add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(getattr(self, "n", 3)))
        y = self.cv2(self.cat.cat(y, 1))
        return self.skip_add.add(y, x) if getattr(self, "add", False) else y


class QuantizableSPP(SPP):
    """SPP (YOLOv3-SPP): parallel INT8 max pools and a ``FloatFunctional`` concat."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat."""
        self.cat = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        return self.cv2(self.cat.cat([x] + [m(x) for m in self.m], 1))


class QuantizableConcat(Concat):
    """The neck's feature concat, through ``FloatFunctional``."""

    def init_quant_ops(self) -> None:
        """Adds the quantizable concat."""
        self.cat = FloatFunctional()

    def forward(self, x: list[Tensor]) -> Tensor:
        return self.cat.cat(list(x), self.d)


class QuantizableDetect(Detect):
    """Detect head: box and class convs and the per-level concat in INT8, decoding in float.

    The head's outputs are dequantized right after the concat of the levels (``boxes``: DFL logits,
    ``scores``: class logits). What follows is post-processing and stays in float: the DFL integral
    (a fixed ``arange`` conv after a softmax), anchor making, ``dist2bbox`` and the sigmoid and
    concat of boxes and scores.
    """

    def init_quant_ops(self) -> None:
        """Adds the level concats and the dequant stub; keeps the DFL integral out of quantization."""
        if getattr(self, "one2one_cv2", None) is not None:
            raise QzError("End-to-end (one-to-one) YOLO heads are not quantizable in qz yet; use a v3/v5/v8/11 config.")
        self.box_cat = FloatFunctional()
        self.score_cat = FloatFunctional()
        self.dequant = DeQuantStub()
        if isinstance(self.dfl, DFL):
            self.dfl.qconfig = None  # float post-processing: prepare() must not observe or convert it

    def forward_head(
        self, x: list[Tensor], box_head: nn.Module | None = None, cls_head: nn.Module | None = None
    ) -> dict[str, Tensor | list[Tensor]]:
        if box_head is None or cls_head is None:
            return {}
        bs = x[0].shape[0]
        boxes = self.box_cat.cat([box_head[i](x[i]).view(bs, 4 * self.reg_max, -1) for i in range(self.nl)], -1)
        scores = self.score_cat.cat([cls_head[i](x[i]).view(bs, self.nc, -1) for i in range(self.nl)], -1)
        # Anchors are made from the feature maps' shape and dtype: they must be float tensors.
        feats = [self.dequant(f) for f in x]
        return {"boxes": self.dequant(boxes), "scores": self.dequant(scores), "feats": feats}


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    Bottleneck: QuantizableBottleneck,
    C3: QuantizableC3,
    C3k: QuantizableC3k,
    C2f: QuantizableC2f,
    C3k2: QuantizableC3k2,
    C2PSA: QuantizableC2PSA,
    PSABlock: QuantizablePSABlock,
    Attention: QuantizableAttention,
    SPPF: QuantizableSPPF,
    SPP: QuantizableSPP,
    Concat: QuantizableConcat,
    Detect: QuantizableDetect,
}
# Modules that run on quantized tensors as they are (or hold no computation of their own).
_SUPPORTED: tuple[type[nn.Module], ...] = (
    *_SWAPS.values(),
    nn.Sequential,
    nn.ModuleList,
    Conv,
    DWConv,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.SiLU,
    QuantizableSiLU,
    nn.Sigmoid,
    nn.Identity,
    nn.Upsample,
    nn.MaxPool2d,
    nn.ZeroPad2d,
    DFL,
    FloatFunctional,
    QuantStub,
    DeQuantStub,
)
# The blocks whose convs ``fuse_model(level="blocks")`` fuses.
FUSE_SCOPES: tuple[type[nn.Module], ...] = (
    QuantizableBottleneck,
    QuantizableC3,
    QuantizableC2f,
    QuantizableC2PSA,
    QuantizableSPPF,
    QuantizableSPP,
)


def swap_blocks(model: nn.Module) -> None:
    """Turns every ultralytics block of ``model`` into its quantizable subclass, in place.

    Raises:
        QzError: the model holds a module with no quantizable counterpart in qz (a block of another YOLO).
    """
    unsupported = sorted(
        {type(m).__name__ for m in model.modules() if m is not model and type(m) not in (*_SWAPS, *_SUPPORTED)}
    )
    if unsupported:
        raise QzError(
            f"No quantizable version of ultralytics module(s) {', '.join(unsupported)}. "
            f"qz quantizes the YOLOv3/v5/v8/11 blocks: {', '.join(sorted(c.__name__ for c in _SWAPS))} "
            "besides Conv, nn.Upsample and nn.MaxPool2d."
        )
    for module in list(model.modules()):
        quantizable = _SWAPS.get(type(module))
        if quantizable is not None:
            module.__class__ = quantizable
            module.init_quant_ops()


def conv_bn_groups(model: nn.Module, scopes: tuple[type[nn.Module], ...] | None = None) -> list[list[str]]:
    """Dotted ``[conv, bn]`` pairs of every ultralytics Conv (inside ``scopes`` only, if given)."""
    inside = None
    if scopes is not None:
        inside = [name for name, m in model.named_modules() if isinstance(m, scopes)]
    groups = []
    for name, module in model.named_modules():
        if type(module) not in (Conv, DWConv) or type(module.bn) is not nn.BatchNorm2d:
            continue
        if inside is None or any(name.startswith(scope + ".") for scope in inside):
            groups.append([f"{name}.conv", f"{name}.bn"])
    return groups
