"""Inputs of ``nox -s study``: scikit-learn's digits as image folders, and a classifier trained on them.

The digits (1,797 real 8x8 handwritten digits) are split 80/20 by class as the demo splits them, upsampled
to ``--image-size`` px and written as PNGs in one subfolder per class (``train/``, ``val/``). ``--model``
(the demo's ResNet-18 by default) is trained with the demo's ``train_float`` on ``train/`` read the
classification task's way (its default transform at ``--image-size``), so ``qz study --input-size`` scores
it on exactly what it was trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import qz_core
from qz_classification.demo import train_float
from qz_core import write_atomic


def write_digit_folders(root: Path, image_size: int, seed: int = 0) -> tuple[Path, Path]:
    """``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png``; returns both folders."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    train, val = train_test_split(range(len(pixels)), test_size=0.2, stratify=digits.target, random_state=seed)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).convert("RGB").save(folder / f"{i:04d}.png")
    return root / "train", root / "val"


def train_classifier(name: str, train_dir: Path, image_size: int, epochs: int, checkpoint: Path, seed: int = 0) -> Path:
    """Trains float classifier ``name`` on ``train_dir`` (task transform at ``image_size``), saves its state dict."""
    torch.manual_seed(seed)
    spec = qz_core.get_model_spec(name).variant(input_size=(image_size, image_size), preprocess=None)
    task = qz_core.get_task(spec.task)
    dataset = task.training_data(spec, train_dir, task.transform(spec, None))
    loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = qz_core.get_model(name, num_classes=10)
    train_float(model, loader, epochs)
    state = model.state_dict()
    write_atomic(checkpoint, lambda file: torch.save(state, file))
    return checkpoint


def main() -> None:
    """Writes the folders and the checkpoint under ``--out`` (skips what is already there)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train/, val/ and MODEL_digits.pth")
    parser.add_argument("--model", default="resnet18", help="registered classifier to train")
    parser.add_argument("--image-size", type=int, default=64, help="digits upsampled to this size in px")
    parser.add_argument("--epochs", type=int, default=3, help="FP32 training epochs")
    args = parser.parse_args()
    if not (args.out / "val").is_dir():
        write_digit_folders(args.out, args.image_size)
    checkpoint = args.out / f"{args.model}_digits.pth"
    if not checkpoint.is_file():
        train_classifier(args.model, args.out / "train", args.image_size, args.epochs, checkpoint)
    print(f"digits folders and checkpoint in {args.out}")


if __name__ == "__main__":
    main()
