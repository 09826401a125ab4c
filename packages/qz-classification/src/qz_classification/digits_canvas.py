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

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qz_core import (
    QzError,
)

SPLITS = ("train", "val")
NUM_DIGITS = 10
BACKGROUND_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "horse", "grass", "brick")
MANIFEST = "digits_canvas.json"


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
