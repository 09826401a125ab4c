"""The steps the detection and segmentation demos share: train FP32, quantize by PTQ and QAT, score, time, draw.

The data comes from ``qz_classification.digits_canvas``; each task's ``demo`` module names its model,
metric and defaults in a ``CanvasDemo``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qz_classification.digits_canvas import CanvasConfig, write_digits_canvas
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

BN_BATCHES = 32  # batches that re-estimate BatchNorm statistics after FP32 training
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
    stride: int = 1
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
    for model in models.values():
        model.eval()
    runners = {name: functools.partial(model, inputs) for name, model in models.items()}
    return {name: t.median_ms for name, t in compare_latency(runners, warmup=3, rounds=20, progress=progress).items()}


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
    if seed < 0:
        raise QzError(f"--seed must be >= 0; got {seed}.")
    if size < demo.stride or size % demo.stride:
        raise QzError(f"--image-size must be a multiple of {demo.model}'s stride {demo.stride}; got {size}.")
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


def add_canvas_demo_arguments(parser: argparse.ArgumentParser, demo: CanvasDemo) -> None:
    """The options of ``qz demo --task <task>``; ``func`` runs ``run_canvas_demo(demo, ...)`` with them."""
    from qz_core.cli.arguments import non_negative_int, positive_int

    parser.description = (
        f"FP32 vs INT8 PTQ vs INT8 QAT {demo.model} ({demo.metric}) on canvases of scikit-learn's real digits."
    )
    parser.add_argument("--epochs", type=positive_int, default=demo.epochs, help="FP32 training epochs (from scratch)")
    parser.add_argument(
        "--qat-epochs", type=positive_int, default=demo.qat_epochs, help="quantization-aware training epochs"
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=demo.image_size, help="canvas and model input side (px)"
    )
    parser.add_argument(
        "--num-train", type=positive_int, default=demo.num_train, help="training canvases (val: a quarter)"
    )
    parser.add_argument("--out-dir", default=f"qz-out/demo-{demo.task}", help="folder for data, models, predictions")
    parser.add_argument("--backend", choices=supported_backends(), default=None, help="quantized engine")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data, the training and the split")

    def func(args: argparse.Namespace) -> int:
        run_canvas_demo(
            demo,
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
