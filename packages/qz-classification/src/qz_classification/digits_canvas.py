"""Detection and segmentation data built from real handwritten digits, offline.

scikit-learn's 1,797 real 8x8 digits are upsampled (bilinear, 16-40 px) and blended onto larger
canvases over low-contrast crops of scikit-image's bundled photos. A digit's stroke pixels are its
upsampled ink above one half: they make its mask (class ``digit + 1``, background 0) and its box
(the tightest box around them). Canvases are split into ``train`` and ``val`` by source digit image,
so no digit image appears in both.

Each split folder holds every layout qz reads::

    images/*.png         RGB canvases
    annotations.json     COCO boxes, category id ``digit + 1`` named "0".."9"
    labels/*.txt         YOLO boxes, class ``digit``, normalized center x, y, width, height
    masks/*.png          class maps (0 background, ``digit + 1`` strokes)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qz_core import (
    ModelSpec,
    QzError,
    Task,
    compare_latency,
    define_model,
    estimate_bn_stats,
    get_model_builder,
    get_model_spec,
    get_task,
    list_models,
    load_quantized,
    model_size_mb,
    supported_backends,
    write_atomic,
)
from qz_core.task import Transform

SPLITS = ("train", "val")
NUM_DIGITS = 10
BACKGROUND_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "horse", "grass", "brick")
MANIFEST = "digits_canvas.json"
BN_BATCHES = 32


@dataclass(frozen=True)
class CanvasConfig:
    """How the canvases are drawn.

    Attributes:
        num_train: training canvases.
        num_val: validation canvases.
        size: canvas side in pixels.
        digits_per_canvas: (min, max) digits on one canvas.
        digit_size: (min, max) side of an upsampled digit in pixels.
        val_fraction: share of the source digit images kept for ``val``.
        seed: the one seed of everything random.
    """

    num_train: int = 600
    num_val: int = 150
    size: int = 128
    digits_per_canvas: tuple[int, int] = (2, 4)
    digit_size: tuple[int, int] = (16, 40)
    val_fraction: float = 0.25
    seed: int = 0

    def check(self) -> None:
        """Raises QzError naming the first bad value."""
        if self.num_train < 1 or self.num_val < 1:
            raise QzError(
                f"Need at least one canvas per split; got num_train={self.num_train}, num_val={self.num_val}."
            )
        low, high = self.digit_size
        if not 4 <= low <= high <= self.size // 2:
            raise QzError(
                f"digit_size must satisfy 4 <= min <= max <= size/2 ({self.size // 2}); got {self.digit_size}."
            )
        if not 1 <= self.digits_per_canvas[0] <= self.digits_per_canvas[1]:
            raise QzError(f"digits_per_canvas must be (min, max) with 1 <= min <= max; got {self.digits_per_canvas}.")
        if not 0 < self.val_fraction < 1:
            raise QzError(f"val_fraction must be in (0, 1); got {self.val_fraction}.")


@dataclass
class Placed:
    """One digit on a canvas: its class, source digit image, stroke box (x0, y0, x1, y1 exclusive)."""

    digit: int
    source: int
    box: tuple[int, int, int, int]


@dataclass
class Canvas:
    """One drawn canvas: RGB pixels, its class map and the digits on it."""

    image: np.ndarray
    mask: np.ndarray
    digits: list[Placed] = field(default_factory=list)


def split_digits(targets: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of the source digit images of each split, stratified by class, disjoint."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for digit in range(NUM_DIGITS):
        index = rng.permutation(np.flatnonzero(targets == digit))
        cut = max(1, round(val_fraction * len(index)))
        parts["val"].append(index[:cut])
        parts["train"].append(index[cut:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _photos() -> list[np.ndarray]:
    """scikit-image's bundled photos as float grey images in [0, 1]."""
    import skimage.data

    photos = []
    for name in BACKGROUND_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if image.ndim == 3:
            image = image[..., :3].mean(-1)
        photos.append(image / max(float(image.max()), 1.0))
    return photos


def _background(rng: np.random.Generator, photos: Sequence[np.ndarray], size: int) -> np.ndarray:
    """A low-contrast, tinted crop of a random photo (H, W, 3) in [0, 1]."""
    photo = photos[rng.integers(len(photos))]
    crop = int(rng.integers(size, min(photo.shape[:2]) + 1))
    top, left = (int(rng.integers(0, s - crop + 1)) for s in photo.shape[:2])
    patch = Image.fromarray((photo[top : top + crop, left : left + crop] * 255).astype(np.uint8))
    grey = np.asarray(patch.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    contrast, level = rng.uniform(0.15, 0.35), rng.uniform(0.3, 0.7)
    tint = rng.uniform(-0.08, 0.08, size=3)
    return np.clip(level + contrast * (grey[..., None] - grey.mean()) + tint, 0, 1)


def _upsample(digit: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 digit (0..16) as (side, side) ink in [0, 1], bilinear."""
    image = Image.fromarray((digit / 16.0).astype(np.float32))
    return np.clip(np.asarray(image.resize((side, side), Image.BILINEAR)), 0, 1)


def _free_spot(
    rng: np.random.Generator, taken: list[tuple[int, int, int, int]], side: int, size: int
) -> tuple[int, int] | None:
    """Top-left corner of a ``side`` square that overlaps no taken square, or None after 30 tries."""
    for _ in range(30):
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(x + side <= a or a + c <= x or y + side <= b or b + d <= y for a, b, c, d in taken):
            return y, x
    return None


def draw_canvas(
    rng: np.random.Generator,
    images: np.ndarray,
    targets: np.ndarray,
    pool: np.ndarray,
    photos: Sequence[np.ndarray],
    config: CanvasConfig,
) -> Canvas:
    """Draws one canvas with digits taken from the source images ``pool``."""
    size = config.size
    canvas = Canvas(_background(rng, photos, size), np.zeros((size, size), np.uint8))
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(config.digits_per_canvas[0], config.digits_per_canvas[1] + 1))):
        side = int(rng.integers(config.digit_size[0], config.digit_size[1] + 1))
        spot = _free_spot(rng, taken, side, size)
        if spot is None:
            continue
        y, x = spot
        source = int(pool[rng.integers(len(pool))])
        ink = _upsample(images[source], side)
        strokes = ink > 0.5
        if not strokes.any():
            continue
        taken.append((x, y, side, side))
        base = canvas.image[y : y + side, x : x + side]
        mean = base.mean(axis=(0, 1))
        color = np.where(mean > 0.5, rng.uniform(0.0, 0.25, 3), rng.uniform(0.75, 1.0, 3))
        canvas.image[y : y + side, x : x + side] = base * (1 - ink[..., None]) + color * ink[..., None]
        digit = int(targets[source])
        canvas.mask[y : y + side, x : x + side][strokes] = digit + 1
        rows, cols = np.flatnonzero(strokes.any(1)), np.flatnonzero(strokes.any(0))
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
        canvas.digits.append(Placed(digit, source, box))
    return canvas


def _write_split(folder: Path, canvases: list[Canvas], size: int) -> None:
    for sub in ("images", "labels", "masks"):
        (folder / sub).mkdir(parents=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": d + 1, "name": str(d)} for d in range(NUM_DIGITS)],
    }
    for index, canvas in enumerate(canvases):
        name = f"{index:05d}"
        Image.fromarray((canvas.image * 255).round().astype(np.uint8)).save(folder / "images" / f"{name}.png")
        Image.fromarray(canvas.mask).save(folder / "masks" / f"{name}.png")
        lines = []
        coco["images"].append({"id": index + 1, "file_name": f"{name}.png", "width": size, "height": size})
        for placed in canvas.digits:
            x0, y0, x1, y1 = placed.box
            lines.append(
                f"{placed.digit} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}"
            )
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": index + 1,
                    "category_id": placed.digit + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "source_digit": placed.source,
                }
            )
        (folder / "labels" / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    (folder / "annotations.json").write_text(json.dumps(coco))


def draw_split(name: str, config: CanvasConfig) -> list[Canvas]:
    """The canvases of one split, deterministic in ``config.seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pools = split_digits(digits.target, config.val_fraction, config.seed)
    rng = np.random.default_rng([config.seed, SPLITS.index(name)])
    photos = _photos()
    count = config.num_train if name == "train" else config.num_val
    return [draw_canvas(rng, digits.images, digits.target, pools[name], photos, config) for _ in range(count)]


def _replace_dir(tmp: Path, target: Path) -> None:
    """Puts the finished folder ``tmp`` where ``target`` is, removing an old ``target`` only after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_digits_canvas(root: str | os.PathLike, config: CanvasConfig | None = None) -> dict[str, Path]:
    """Writes ``root/train`` and ``root/val`` (all layouts), whole or not at all; reuses a matching folder.

    Returns:
        The folder of each split.
    """
    config = config or CanvasConfig()
    config.check()
    root = Path(root)
    folders = {name: root / name for name in SPLITS}
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == _manifest(config):
        return folders
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for name in SPLITS:
            _write_split(tmp / name, draw_split(name, config), config.size)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(config), indent=1))
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folders


def _manifest(config: CanvasConfig) -> dict:
    return {"generator": "qz digits_canvas v1", **json.loads(json.dumps(asdict(config)))}


# The steps the detection and segmentation demos share: train FP32, quantize by PTQ and QAT, score, time, draw.

Evaluate = Callable[[nn.Module, Task, ModelSpec, Path, Transform], float]


@dataclass(frozen=True)
class CanvasDemo:
    """What differs between the canvas demos: the task, the model, its metric and the defaults.

    ``preprocess(size)`` is the model's input transform at the demo's size, when the spec names one;
    ``float_loss(model, batch)`` replaces the task's loss for FP32 training from scratch (QAT keeps the task's).
    """

    task: str
    model: str
    metric: str
    num_classes: int
    evaluate: Evaluate
    epochs: int
    qat_epochs: int
    lr: float
    qat_lr: float = 1e-4
    batch_size: int = 16
    num_train: int = 600
    image_size: int = 128
    preprocess: Callable[[int], Transform] | None = None
    float_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None


@dataclass
class DemoRow:
    """One precision's line of the demo table; ``metric`` in [0, 1]."""

    precision: str
    metric: float
    size_mb: float
    latency_ms: float


@dataclass
class DemoResult:
    """What a canvas demo measured and the files it wrote."""

    task: str
    model: str
    metric: str
    rows: list[DemoRow]
    data: dict[str, Path]
    checkpoint: Path
    ptq: Path
    qat: Path
    predictions: list[Path]
    fp32_losses: list[float] = field(default_factory=list)

    def row(self, precision: str) -> DemoRow:
        """The row of 'FP32', 'INT8 PTQ' or 'INT8 QAT'."""
        return next(r for r in self.rows if r.precision == precision)

    @property
    def ptq_drop(self) -> float:
        """FP32 metric minus INT8 PTQ metric."""
        return self.row("FP32").metric - self.row("INT8 PTQ").metric

    @property
    def qat_drop(self) -> float:
        """FP32 metric minus INT8 QAT metric."""
        return self.row("FP32").metric - self.row("INT8 QAT").metric

    def table(self) -> str:
        """The rows as a table (tabulate's when installed), drops and ratios against FP32."""
        base = self.row("FP32")
        header = ["precision", self.metric, "drop vs FP32", "size (MB)", "size ratio", "latency (ms)", "latency ratio"]
        body = [
            [
                r.precision,
                f"{r.metric:.4f}",
                "" if r is base else f"{base.metric - r.metric:+.4f}",
                f"{r.size_mb:.2f}",
                f"{r.size_mb / base.size_mb:.2f}",
                f"{r.latency_ms:.2f}",
                f"{r.latency_ms / base.latency_ms:.2f}",
            ]
            for r in self.rows
        ]
        try:
            from tabulate import tabulate
        except ImportError:
            widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
            return "\n".join(
                "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]
            )
        return tabulate(body, header, tablefmt="github", stralign="right")


def demo_spec(model: str, image_size: int, preprocess: Callable[[int], Transform] | None = None) -> ModelSpec:
    """``model`` at ``image_size`` px, registered once as ``<model>_<size>px``.

    The tasks' transforms read the input size from the spec (or take the spec's ``preprocess``,
    here ``preprocess(image_size)``), so the demo's smaller inputs need a spec of their own.
    """
    name = f"{model}_{image_size}px"
    if name not in list_models():
        base = get_model_spec(model)
        changes: dict[str, Any] = {"input_size": (image_size, image_size)}
        if preprocess is not None:
            changes["preprocess"] = functools.partial(preprocess, image_size)
        define_model(
            base.variant(name=name, description=f"{base.name} at {image_size} px (the digits demo)", **changes),
            module=__name__,
        )
    return get_model_spec(name)


def train_float(
    model: nn.Module,
    data: DataLoader,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    epochs: int,
    lr: float,
    progress: bool = True,
) -> list[float]:
    """Plain FP32 training with AdamW and a one-cycle schedule; the mean ``loss_fn(model, batch)`` per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps = max(1, epochs * len(data))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = []
    for epoch in tqdm(range(epochs), desc="FP32 training", unit="epoch", disable=not progress):
        model.train()
        total = 0.0
        bar = tqdm(data, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress)
        for batch in bar:
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(total / max(1, len(data)))
    model.eval()
    return losses


def _latencies_ms(models: dict[str, nn.Module], inputs: Any, progress: bool) -> dict[str, float]:
    """Batch-1 median latency of each model, timed round by round so load on the machine hits all alike."""
    threads = torch.get_num_threads()
    for model in models.values():
        model.eval()
    try:
        runners = {name: functools.partial(model, inputs) for name, model in models.items()}
        return {
            name: t.median_ms for name, t in compare_latency(runners, warmup=3, rounds=20, progress=progress).items()
        }
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def run_canvas_demo(
    demo: CanvasDemo,
    *,
    epochs: int | None = None,
    qat_epochs: int | None = None,
    image_size: int | None = None,
    num_train: int | None = None,
    out_dir: str | os.PathLike | None = None,
    backend: str | None = None,
    seed: int = 0,
    num_predictions: int = 4,
    progress: bool = True,
) -> DemoResult:
    """Draws the canvases, trains ``demo.model`` in FP32, quantizes it by PTQ and QAT, and prints one table."""
    from qz_core.job import ModelSource, QuantizeRequest, predict_images, quantize_model

    epochs = demo.epochs if epochs is None else epochs
    qat_epochs = demo.qat_epochs if qat_epochs is None else qat_epochs
    size = image_size or demo.image_size
    num_train = num_train or demo.num_train
    if epochs < 1 or qat_epochs < 1 or num_train < 1:
        raise QzError(f"--epochs, --qat-epochs and --num-train must be >= 1; got {epochs}, {qat_epochs}, {num_train}.")
    out = Path(out_dir or f"qz-out/demo-{demo.task}")
    torch.manual_seed(seed)
    config = CanvasConfig(
        num_train=num_train,
        num_val=max(8, num_train // 4),
        size=size,
        digit_size=(size // 8, size * 5 // 16),
        seed=seed,
    )
    folders = write_digits_canvas(out / "data", config)
    spec, task = demo_spec(demo.model, size, demo.preprocess), get_task(demo.task)
    transform = task.transform(spec, None)
    train = DataLoader(
        task.training_data(spec, folders["train"], transform),
        batch_size=demo.batch_size,
        shuffle=True,
        collate_fn=task.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    model = get_model_builder(spec.name)(num_classes=demo.num_classes, backend=backend)
    losses = train_float(model, train, demo.float_loss or task.training_loss, epochs, demo.lr, progress)
    with torch.no_grad():  # running statistics of the final weights (BatchNorm momentum lags a short training)
        estimate_bn_stats(model, [task.model_inputs(batch) for batch in itertools.islice(train, BN_BATCHES)])
    checkpoint = out / f"{spec.name}_fp32.pth"
    write_atomic(checkpoint, lambda file: torch.save(model.state_dict(), file))

    common = dict(
        model=spec.name,
        weights=str(checkpoint),
        batch_size=demo.batch_size,
        model_kwargs={"num_classes": demo.num_classes, "backend": backend},
        latency=False,
        progress=progress,
    )
    ptq_path, qat_path = out / f"{spec.name}_int8_ptq.pt", out / f"{spec.name}_int8_qat.pt"
    quantize_model(QuantizeRequest(out=ptq_path, calib=folders["train"], calib_batches=16, **common))
    quantize_model(
        QuantizeRequest(out=qat_path, qat=True, train=folders["train"], epochs=qat_epochs, lr=demo.qat_lr, **common)
    )
    models = {"FP32": model.eval(), "INT8 PTQ": load_quantized(ptq_path), "INT8 QAT": load_quantized(qat_path)}

    sample = task.model_inputs(task.collate([task.calibration_data(spec, folders["val"], transform)[0]]))
    latency = _latencies_ms(models, sample, progress)
    rows = [
        DemoRow(name, demo.evaluate(m, task, spec, folders["val"], transform), model_size_mb(m), latency[name])
        for name, m in tqdm(models.items(), desc="evaluate", unit="model", disable=not progress)
    ]
    images = sorted((folders["val"] / "images").glob("*.png"))[:num_predictions]
    drawn = predict_images(
        ModelSource(spec.name, weights=str(checkpoint), int8=qat_path),
        images,
        out / "predictions",
        num_classes=demo.num_classes,
    )
    result = DemoResult(demo.task, spec.name, demo.metric, rows, folders, checkpoint, ptq_path, qat_path, drawn, losses)
    print(
        f"\n{spec.name}: {demo.metric} on {config.num_val} validation canvases of real digits "
        f"({size}x{size}, {epochs} FP32 + {qat_epochs} QAT epochs on {num_train} canvases), batch-1 latency\n"
    )
    print(result.table())
    print(f"\nfiles in {out}: checkpoint, INT8 PTQ and QAT models, data/, predictions/ ({len(drawn)} PNGs)")
    return result


def add_canvas_demo_arguments(parser: argparse.ArgumentParser, demo: CanvasDemo, run: Callable[..., Any]) -> None:
    """The options of ``qz demo <task>``; ``func`` calls ``run`` with them and returns 0."""
    parser.description = (
        f"FP32 vs INT8 PTQ vs INT8 QAT {demo.model} ({demo.metric}) on canvases of scikit-learn's real digits."
    )
    parser.add_argument("--epochs", type=int, default=demo.epochs, help="FP32 training epochs (from scratch)")
    parser.add_argument("--qat-epochs", type=int, default=demo.qat_epochs, help="quantization-aware training epochs")
    parser.add_argument("--image-size", type=int, default=demo.image_size, help="canvas and model input side (px)")
    parser.add_argument("--num-train", type=int, default=demo.num_train, help="training canvases (val: a quarter)")
    parser.add_argument("--out-dir", default=f"qz-out/demo-{demo.task}", help="folder for data, models, predictions")
    parser.add_argument("--backend", choices=supported_backends(), default=None, help="quantized engine")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the split")

    def func(args: argparse.Namespace) -> int:
        run(
            epochs=args.epochs,
            qat_epochs=args.qat_epochs,
            image_size=args.image_size,
            num_train=args.num_train,
            out_dir=args.out_dir,
            backend=args.backend,
            seed=args.seed,
        )
        return 0

    parser.set_defaults(func=func)
