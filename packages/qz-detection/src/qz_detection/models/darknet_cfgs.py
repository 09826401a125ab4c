"""AlexeyAB's ``yolov4.cfg`` and ``yolov4-tiny.cfg`` (80 COCO classes, 608 and 416 px), written out section by section.

Shipped as text so no data file has to travel with the package; ``darknet.read_cfg`` takes their names.
"""

from __future__ import annotations


def _section(kind: str, **options: object) -> str:
    return "\n".join([f"[{kind}]", *(f"{k}={v}" for k, v in options.items())]) + "\n\n"


def _conv(filters: int, size: int = 1, stride: int = 1, activation: str = "mish", bn: bool = True) -> str:
    norm = {"batch_normalize": 1} if bn else {}
    return _section("convolutional", **norm, filters=filters, size=size, stride=stride, pad=1, activation=activation)


def _csp_stage(filters: int, blocks: int, hidden: int, inner: int) -> str:
    """A CSPDarknet53 stage: downsampling conv, split, residual units on one part, concat, transition."""
    residual = (_conv(inner) + _conv(hidden, 3) + _section("shortcut", **{"from": -3}, activation="linear")) * blocks
    return (
        _conv(filters, 3, 2)
        + _conv(hidden)
        + _section("route", layers=-2)
        + _conv(hidden)
        + residual
        + _conv(hidden)
        + _section("route", layers=f"-1,-{3 * blocks + 4}")
        + _conv(filters)
    )


_YOLO_OPTIONS = {
    "jitter": ".3",
    "ignore_thresh": ".7",
    "truth_thresh": 1,
    "iou_thresh": 0.213,
    "cls_normalizer": 1.0,
    "iou_normalizer": 0.07,
    "iou_loss": "ciou",
    "nms_kind": "greedynms",
    "beta_nms": 0.6,
}


def _yolo(mask: str, anchors: str, num: int, scale_x_y: float, **extra: object) -> str:
    return _section(
        "yolo", mask=mask, anchors=anchors, classes=80, num=num, **_YOLO_OPTIONS, scale_x_y=scale_x_y, **extra
    )


def _leaky(filters: int, size: int = 1, stride: int = 1) -> str:
    return _conv(filters, size, stride, "leaky")


def _five_convs(filters: int) -> str:
    return _leaky(filters) + _leaky(2 * filters, 3) + _leaky(filters) + _leaky(2 * filters, 3) + _leaky(filters)


_V4_ANCHORS = "12, 16, 19, 36, 40, 28, 36, 75, 76, 55, 72, 146, 142, 110, 192, 243, 459, 401"
_V4_NET = _section(
    "net",
    batch=64,
    subdivisions=8,
    width=608,
    height=608,
    channels=3,
    momentum=0.949,
    decay=0.0005,
    angle=0,
    saturation=1.5,
    exposure=1.5,
    hue=".1",
    learning_rate=0.0013,
    burn_in=1000,
    max_batches=500500,
    policy="steps",
    steps="400000,450000",
    scales=".1,.1",
    mosaic=1,
)
_V4_BACKBONE = (
    _conv(32, 3)
    + _csp_stage(64, 1, hidden=64, inner=32)
    + _csp_stage(128, 2, hidden=64, inner=64)
    + _csp_stage(256, 8, hidden=128, inner=128)  # layer 54: the stride-8 output the neck routes to
    + _csp_stage(512, 8, hidden=256, inner=256)  # layer 85: stride 16
    + _csp_stage(1024, 4, hidden=512, inner=512)  # layer 104: stride 32
)
_V4_NECK = (
    _leaky(512)
    + _leaky(1024, 3)
    + _leaky(512)
    + _section("maxpool", stride=1, size=5)
    + _section("route", layers=-2)
    + _section("maxpool", stride=1, size=9)
    + _section("route", layers=-4)
    + _section("maxpool", stride=1, size=13)
    + _section("route", layers="-1,-3,-5,-6")
    + _leaky(512)
    + _leaky(1024, 3)
    + _leaky(512)
    + _leaky(256)
    + _section("upsample", stride=2)
    + _section("route", layers=85)
    + _leaky(256)
    + _section("route", layers="-1, -3")
    + _five_convs(256)
    + _leaky(128)
    + _section("upsample", stride=2)
    + _section("route", layers=54)
    + _leaky(128)
    + _section("route", layers="-1, -3")
    + _five_convs(128)
)
_V4_HEAD = (
    _leaky(256, 3)
    + _conv(255, activation="linear", bn=False)
    + _yolo("0,1,2", _V4_ANCHORS, 9, 1.2, max_delta=5)
    + _section("route", layers=-4)
    + _leaky(256, 3, 2)
    + _section("route", layers="-1, -16")
    + _five_convs(256)
    + _leaky(512, 3)
    + _conv(255, activation="linear", bn=False)
    + _yolo("3,4,5", _V4_ANCHORS, 9, 1.1, max_delta=5)
    + _section("route", layers=-4)
    + _leaky(512, 3, 2)
    + _section("route", layers="-1, -37")
    + _five_convs(512)
    + _leaky(1024, 3)
    + _conv(255, activation="linear", bn=False)
    + _yolo("6,7,8", _V4_ANCHORS, 9, 1.05, random=1, max_delta=5)
)
YOLOV4_CFG = _V4_NET + _V4_BACKBONE + _V4_NECK + _V4_HEAD


def _tiny_csp(filters: int) -> str:
    """yolov4-tiny's CSP block: conv, second half of its channels (route groups), two convs, concats, max pool."""
    return (
        _leaky(filters, 3)
        + _section("route", layers=-1, groups=2, group_id=1)
        + _leaky(filters // 2, 3)
        + _leaky(filters // 2, 3)
        + _section("route", layers="-1,-2")
        + _leaky(filters)
        + _section("route", layers="-6,-1")
        + _section("maxpool", size=2, stride=2)
    )


_TINY_ANCHORS = "10,14,  23,27,  37,58,  81,82,  135,169,  344,319"
_TINY_NET = _section(
    "net",
    batch=64,
    subdivisions=1,
    width=416,
    height=416,
    channels=3,
    momentum=0.9,
    decay=0.0005,
    angle=0,
    saturation=1.5,
    exposure=1.5,
    hue=".1",
    learning_rate=0.00261,
    burn_in=1000,
    max_batches=2000200,
    policy="steps",
    steps="1600000,1800000",
    scales=".1,.1",
)
YOLOV4_TINY_CFG = (
    _TINY_NET
    + _leaky(32, 3, 2)
    + _leaky(64, 3, 2)
    + _tiny_csp(64)
    + _tiny_csp(128)
    + _tiny_csp(256)  # layer 23: the 256-channel stride-16 map the second head routes to
    + _leaky(512, 3)
    + _leaky(256)
    + _leaky(512, 3)
    + _conv(255, activation="linear", bn=False)
    + _yolo("3,4,5", _TINY_ANCHORS, 6, 1.05, random=0, resize=1.5)
    + _section("route", layers=-4)
    + _leaky(128)
    + _section("upsample", stride=2)
    + _section("route", layers="-1, 23")
    + _leaky(256, 3)
    + _conv(255, activation="linear", bn=False)
    + _yolo("1,2,3", _TINY_ANCHORS, 6, 1.05, random=0, resize=1.5)
)

BUILTIN_CFGS = {"yolov4.cfg": YOLOV4_CFG, "yolov4-tiny.cfg": YOLOV4_TINY_CFG}
