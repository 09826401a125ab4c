"""ImageNet validation folders: synset folders mapped to torchvision's class indices.

torchvision's ImageNet-1k class order (the order of ``weights.meta["categories"]`` and of the
classifier's outputs) is the sorted list of the 1000 WordNet synset ids, as built by
``torchvision.datasets.ImageNet``. ``imagenet_synsets.txt`` beside this module holds that list,
taken from timm's ``timm/data/_info/imagenet_synsets.txt`` (timm 1.0.31 on PyPI) and checked
against torchvision's category names: 998 of 1000 match a WordNet lemma of their synset exactly,
the other two are torchvision's disambiguated 'crane bird' (n02012849) and 'maillot tank suit'
(n03710721).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from qz_core import QzError
from qz_core.data import IMAGE_EXTENSIONS
from qz_core.errors import closest

SYNSETS_FILE = "imagenet_synsets.txt"
LABELS_IMAGENET = "ImageNet-1k synset ids"
LABELS_INDEX = "class indices"


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in torchvision's class order (index i is class i)."""
    try:
        text = resources.files("qz_classification").joinpath(SYNSETS_FILE).read_text()
    except FileNotFoundError:
        raise QzError(
            f"qz_classification/{SYNSETS_FILE} is missing from this installation; reinstall qz-classification."
        ) from None
    synsets = tuple(text.split())
    if len(synsets) != 1000 or list(synsets) != sorted(set(synsets)):
        raise QzError(f"qz_classification/{SYNSETS_FILE} is damaged: expected 1000 sorted, distinct synset ids.")
    return synsets


def read_class_index(path: str | os.PathLike) -> dict[str, int]:
    """Reads a folder-name to class-index mapping for label sets other than ImageNet-1k.

    Accepted forms: a JSON object ``{"folder": index}``; or text with one folder name per line,
    the line number (from 0) being its index, or ``name index`` per line. Blank lines and lines
    starting with ``#`` are skipped.

    Raises:
        QzError: the file is missing or malformed.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise QzError(f"Class index file {str(file)!r} does not exist.")
    text = file.read_text()
    if file.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QzError(f"Class index file {str(file)!r} is not valid JSON: {exc}") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, int) and v >= 0 for v in mapping.values()):
            raise QzError(f"Class index file {str(file)!r} must hold a JSON object of folder name -> index >= 0.")
        return {str(k): v for k, v in mapping.items()}
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    mapping = {}
    for number, line in enumerate(lines):
        parts = line.replace(",", " ").replace("\t", " ").split()
        if len(parts) == 1:
            mapping[parts[0]] = number
        elif len(parts) == 2 and parts[1].isdigit():
            mapping[parts[0]] = int(parts[1])
        else:
            raise QzError(
                f"Class index file {str(file)!r}: cannot read line {line!r}; expected 'name' or 'name index'."
            )
    if not mapping:
        raise QzError(f"Class index file {str(file)!r} names no classes.")
    return mapping


def validation_root(path: str | os.PathLike) -> Path:
    """The folder holding the class folders: ``path`` itself, or ``path/val`` when it has one."""
    root = Path(path).expanduser()
    if not root.exists():
        raise QzError(f"The validation folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise QzError(f"The validation folder {str(root)!r} is not a folder.")
    if (root / "val").is_dir():
        return root / "val"
    return root


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _unknown_synset(name: str, root: Path, count: int) -> QzError:
    synsets = imagenet_synsets()
    near = closest(name, synsets)
    hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return QzError(
        f"Unknown class folder {name!r} in {str(root)!r} ({count} such folders): not one of the "
        f"{len(synsets)} valid ImageNet-1k synset ids ({synsets[0]}, {synsets[1]}, ..., {synsets[-1]}).{hint} "
        "Name class folders by synset id or by class index (0, 1, ...), or pass a class index file "
        "(--class-index) for another label set."
    )


def folder_labels(
    root: Path, class_index: Mapping[str, int] | None = None, *, num_classes: int | None = None
) -> tuple[dict[str, int], str]:
    """Maps the class folders of ``root`` to class indices, and says which label set they use.

    Folder names are ImageNet synset ids (to torchvision's index), integers (the index itself),
    or keys of ``class_index``.

    Raises:
        QzError: no class folders, an unknown folder name, or an index >= ``num_classes``.
    """
    folders = _class_folders(root)
    if not folders:
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
        layout = "holds images but no class folders" if has_images else "is empty"
        raise QzError(
            f"The validation folder {str(root)!r} {layout}: expected one subfolder per class, named by ImageNet "
            "synset id (n01440764/, n01443537/, ...) or class index (0/, 1/, ...)."
        )
    if class_index is not None:
        unknown = [f for f in folders if f not in class_index]
        if unknown:
            near = closest(unknown[0], class_index)
            hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise QzError(
                f"Class folder {unknown[0]!r} in {str(root)!r} ({len(unknown)} such folders) is not in the class "
                f"index file, which names {len(class_index)} classes.{hint}"
            )
        labels, source = {f: class_index[f] for f in folders}, "class index file"
    elif all(f.isdigit() for f in folders):
        labels, source = {f: int(f) for f in folders}, LABELS_INDEX
    else:
        positions = {s: i for i, s in enumerate(imagenet_synsets())}
        unknown = [f for f in folders if f not in positions]
        if unknown:
            raise _unknown_synset(unknown[0], root, len(unknown))
        labels, source = {f: positions[f] for f in folders}, LABELS_IMAGENET
    if num_classes is not None:
        check_class_count(root, labels, source, num_classes)
    return labels, source


def check_class_count(root: Path, labels: Mapping[str, int], source: str, num_classes: int) -> None:
    """Raises unless the folders' labels fit a model with ``num_classes`` outputs."""
    if source == LABELS_IMAGENET and num_classes != len(imagenet_synsets()):
        raise QzError(
            f"The class count does not match: the folders of {str(root)!r} are {LABELS_IMAGENET} "
            f"({len(imagenet_synsets())} classes), but the model has {num_classes} classes. Evaluate a "
            f"1000-class ImageNet model, or name the folders by class index 0..{num_classes - 1} (or pass a class "
            "index file) for a model trained on other classes."
        )
    outside = sorted((i, f) for f, i in labels.items() if i >= num_classes)
    if outside:
        index, name = outside[-1]
        raise QzError(
            f"Class folder {name!r} in {str(root)!r} is class {index}, but the model has {num_classes} classes "
            f"(valid indices 0..{num_classes - 1})."
        )


class LabeledImages(Dataset):
    """Images of class folders with fixed labels: ``(transform(image), label)`` items.

    Attributes:
        root: the folder holding the class folders.
        samples: ``(path, label)`` pairs, sorted by folder then file name.
        class_to_idx: folder name -> class index.
        label_source: which labels the folder names are ('ImageNet-1k synset ids', ...).
    """

    def __init__(
        self,
        root: Path,
        class_to_idx: Mapping[str, int],
        transform: Callable[[Image.Image], Any] | None = None,
        label_source: str = LABELS_INDEX,
    ) -> None:
        self.root = root
        self.class_to_idx = dict(class_to_idx)
        self.transform = transform
        self.label_source = label_source
        self.samples: list[tuple[Path, int]] = []
        for folder, label in sorted(self.class_to_idx.items()):
            for dirpath, _, files in sorted(os.walk(root / folder, followlinks=True)):
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((Path(dirpath) / name, label))
        if not self.samples:
            raise QzError(
                f"The validation folder {str(root)!r} holds no images in its {len(self.class_to_idx)} class folders "
                f"({', '.join(IMAGE_EXTENSIONS)})."
            )

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), label


def imagenet_folder(
    path: str | os.PathLike,
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    class_index: str | os.PathLike | Mapping[str, int] | None = None,
    num_classes: int | None = None,
) -> LabeledImages:
    """An ImageNet-style validation folder (``path`` or ``path/val``) with torchvision's labels.

    Args:
        path: folder of class folders named by synset id (``n01440764/``) or class index (``0/``).
        transform: applied to each PIL image, e.g. ``weights.transforms()``.
        class_index: a mapping, or a file for ``read_class_index``, for folders of other label sets.
        num_classes: the model's class count; a folder whose index is outside it is an error.
    """
    root = validation_root(path)
    if class_index is not None and not isinstance(class_index, Mapping):
        class_index = read_class_index(class_index)
    labels, source = folder_labels(root, class_index, num_classes=num_classes)
    return LabeledImages(root, labels, transform, source)
