"""The qz demo: FP32 vs INT8 PTQ vs INT8 QAT on real data, in one table.

By default a ResNet-18 is trained on scikit-learn's bundled ``digits`` images (real handwritten
digits, upsampled to RGB), so the demo runs offline. With ``--weights DEFAULT --data DIR`` the same
steps fine-tune torchvision's pretrained weights on a user's image folder.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm.auto import tqdm

import qz_core
from qz_classification.data import training_images
from qz_classification.evaluate import topk_accuracy
from qz_classification.task import TASK
from qz_core import QzError, write_atomic


@dataclass
class DemoData:
    """Train and test loaders plus the class count."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    image_size: int


def digits_data(image_size: int = 64, batch_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DemoData:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to ``image_size`` RGB, split by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    dataset = TensorDataset(images, labels)
    generator = torch.Generator().manual_seed(seed)
    return DemoData(
        DataLoader(Subset(dataset, train_idx), batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(Subset(dataset, test_idx), batch_size=64),
        num_classes=10,
        image_size=image_size,
    )


def folder_data(root: str | os.PathLike, transform, batch_size: int = 32, seed: int = 0) -> DemoData:
    """A user's image folder: ``train/`` and ``val/`` subfolders, or one ImageFolder split 80/20."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = training_images(root / "train", transform)
        test = training_images(root / "val", transform, purpose="validation")
        num_classes = len(train.classes)
    else:
        full = training_images(root, transform, purpose="data")
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, int(0.8 * len(order)))
        train, test, num_classes = Subset(full, order[:cut]), Subset(full, order[cut:]), len(full.classes)
    size = transform.crop_size[0] if hasattr(transform, "crop_size") else 224
    generator = torch.Generator().manual_seed(seed)
    return DemoData(
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=batch_size),
        num_classes,
        size,
    )


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Gives a pretrained classifier a fresh linear head with ``num_classes`` outputs, if it differs."""
    for name in ("fc", "classifier"):
        head = getattr(model, name, None)
        if getattr(head, "out_features", None) == num_classes:
            return
        if isinstance(head, nn.Linear):
            setattr(model, name, nn.Linear(head.in_features, num_classes))
            return
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            head[-1] = nn.Linear(head[-1].in_features, num_classes)
            return
    raise QzError(f"Cannot find a linear classification head to resize on {type(model).__name__}.")


def train_float(model: nn.Module, data: DataLoader, epochs: int, lr: float = 1e-3) -> None:
    """Plain FP32 training with Adam and a cosine schedule, with a progress bar per epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * len(data)))
    for epoch in tqdm(range(epochs), desc="FP32 training", unit="epoch"):
        model.train()
        bar = tqdm(data, desc=f"epoch {epoch + 1}", unit="batch", leave=False)
        for images, labels in bar:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@dataclass
class Row:
    """One line of the demo table."""

    name: str
    top1: float
    size_mb: float
    latency_ms: float = 0.0


def run_demo(
    model_name: str = "resnet18",
    *,
    weights: str | None = None,
    data: str | None = None,
    epochs: int = 3,
    qat_epochs: int = 1,
    image_size: int = 64,
    calib_batches: int = 16,
    backend: str | None = None,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[Row]:
    """Trains (or fine-tunes) a float model, quantizes it by PTQ and by QAT, and prints one table."""
    torch.manual_seed(seed)
    spec = qz_core.get_model_spec(model_name)
    if spec.task != "classification":
        raise QzError(f"The demo takes a classification model; {model_name!r} is a {spec.task} model.")
    builder = qz_core.get_model_builder(model_name)
    if data is None:
        dataset = digits_data(image_size)
    else:
        dataset = folder_data(data, qz_core.get_model_transforms(model_name, weights))
    out = Path(out_dir or tempfile.mkdtemp(prefix="qz-demo-"))
    out.mkdir(parents=True, exist_ok=True)

    if weights is None:
        model = builder(num_classes=dataset.num_classes)
    else:
        model = builder(weights=weights)
        _replace_head(model, dataset.num_classes)
    if epochs:
        train_float(model, dataset.train, epochs)
    checkpoint = out / f"{model_name}_fp32.pth"
    state = model.state_dict()
    write_atomic(checkpoint, lambda file: torch.save(state, file))

    build = dict(weights=str(checkpoint), num_classes=dataset.num_classes, backend=backend)
    ptq = builder(**build, quantize=True)
    qz_core.calibrate(ptq, dataset.train, num_batches=calib_batches)
    ptq = qz_core.convert(ptq)

    qat = builder(**build, quantize=True, is_qat=True)
    qz_core.train_qat(qat, dataset.train, step_loss=TASK.training_loss, epochs=qat_epochs, lr=1e-4, freeze_bn_after=0)
    qat = qz_core.convert(qat)
    qz_core.save_quantized(ptq, out / f"{model_name}_int8_ptq.pt")
    qz_core.save_quantized(qat, out / f"{model_name}_int8_qat.pt")

    models = {"FP32": model.eval(), "INT8 PTQ": ptq, "INT8 QAT": qat}
    rows = [
        Row(name, topk_accuracy(m, dataset.test, (1,), desc=f"eval {name}")["top1"], qz_core.model_size_mb(m))
        for name, m in models.items()
    ]
    example = next(iter(dataset.test))[0][:1]
    latency = qz_core.compare_latency(
        {name: (lambda m=m: m(example)) for name, m in models.items()}, warmup=5, rounds=30, progress=True
    )
    for row in rows:
        row.latency_ms = latency[row.name].median_ms
    print()
    print(format_table(rows, f"{model_name} on {'digits' if data is None else data}, {example.shape[-1]}px, batch 1"))
    report = qz_core.export_onnx(ptq, out / f"{model_name}_int8.onnx", example)
    agreement = onnx_agreement(ptq, report.path, dataset.test)
    print(f"\n{report}\nonnxruntime INT8 top-1 predictions agree with PyTorch INT8 on {agreement:.1f}% of test images")
    print(f"files in {out}")
    return rows


def onnx_agreement(model: nn.Module, path: Path, data: DataLoader) -> float:
    """Percent of images where onnxruntime and PyTorch pick the same class."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    same = total = 0
    with torch.inference_mode():
        for images, _ in data:
            for image in images.split(1):
                ort_class = session.run(None, {name: image.numpy()})[0].argmax(1)
                same += int((model(image).argmax(1).numpy() == ort_class).sum())
                total += 1
    return 100.0 * same / total


def format_table(rows: list[Row], title: str) -> str:
    """A markdown table with INT8/FP32 ratios against the first (FP32) row."""
    base = rows[0]
    lines = [
        f"### {title}",
        "| model | top-1 (%) | size (MB) | size ratio | latency (ms) | latency ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.top1:.2f} | {r.size_mb:.2f} | {r.size_mb / base.size_mb:.2f} "
            f"| {r.latency_ms:.2f} | {r.latency_ms / base.latency_ms:.2f} |"
        )
    return "\n".join(lines)
