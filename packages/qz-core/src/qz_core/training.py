"""Quantization-aware training as people run it: epochs, a schedule, checkpoints, resume, torchrun, CUDA.

``train_qat_model(config)`` follows torchvision's ``references/classification/train_quantization.py``
recipe for any task: SGD with momentum and weight decay, a StepLR schedule, observers and BatchNorm
statistics frozen after set epochs, and after every epoch an INT8 copy converted on the CPU and scored
with ``Task.score`` on the validation folder. Launched by ``torchrun`` it trains DistributedDataParallel
(gloo on the CPU, nccl on CUDA); only rank 0 scores, writes files and prints.

Observers under DDP: DDP broadcasts rank 0's buffers (observer ranges, fake-quant scales, BatchNorm
statistics) before every forward, so every rank trains with rank 0's; after each epoch rank 0's buffers
are broadcast again, so all ranks hold the same state, and rank 0's converted model is the one saved.

The output folder holds ``checkpoint.pt`` (written whole after every epoch), ``int8_best.pt`` and
``int8_last.pt`` (``load_quantized``) and ``history.json``. Every epoch draws its random numbers
from (seed, epoch, rank), so a resumed run reaches the same weights as one never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.ao.quantization as tq
import torch.distributed as dist
from torch import Tensor, nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from qz_core.builder import ModelSpec
from qz_core.distributed import (
    Ranks,
    agreed_start,
    broadcast_buffers,
    check_device,
    launch_ranks,
    process_group,
    to_device,
    training_device,
)
from qz_core.errors import QzError, unreadable_file
from qz_core.files import check_output_dir, write_atomic, write_text_atomic
from qz_core.registry import get_model_builder, get_model_spec, get_task
from qz_core.task import Task, Transform
from qz_core.weights import WeightsSource, resolve_weights
from qz_core.workflow import convert, save_quantized

CHECKPOINT = "checkpoint.pt"
BEST_INT8 = "int8_best.pt"
LAST_INT8 = "int8_last.pt"
HISTORY = "history.json"
CHECKPOINT_FORMAT = "qz.qat-checkpoint"
# Changing one of these between a run and its resume would not continue the same training.
RESUME_FIELDS = (
    "model",
    "weights",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "lr_step",
    "lr_gamma",
    "freeze_observers_after",
    "freeze_bn_after",
    "seed",
    "image_size",
    "model_kwargs",
)


@dataclass(frozen=True)
class QatTrainingConfig:
    """One QAT training run; the defaults are torchvision's quantization recipe.

    Attributes:
        model: registered model name.
        train: labelled training folder, in a layout of the model's task.
        val: labelled validation folder, in the same layouts.
        out: folder for the checkpoint, the INT8 models and the history.
        weights: enum weights name or float checkpoint path; random weights (with a warning) when None.
        epochs: total epochs (a resumed run continues up to this count).
        batch_size: images per batch and process.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_step: StepLR period in epochs.
        lr_gamma: StepLR factor.
        freeze_observers_after: observers update during the first N epochs, then keep their ranges
            (torchvision's ``--num-observer-update-epochs N`` checks a 0-based index after training, so freezes
            one epoch later).
        freeze_bn_after: BatchNorm statistics update during the first N epochs, then stay.
        device: 'cpu' or 'cuda' (fake-quantized training; conversion stays on the CPU).
        workers: data loading processes per training process.
        seed: the seed every epoch's random numbers derive from.
        image_size: train and score at this square input size (the task's default transform) instead of
            the weights' own transform.
        resume: continue from ``out/checkpoint.pt``.
        model_kwargs: the builder's own keywords (``num_classes``) and ``QuantOptions`` fields.
        progress: show progress bars.
    """

    model: str
    train: Path
    val: Path
    out: Path
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    freeze_observers_after: int = 4
    freeze_bn_after: int = 3
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    image_size: int | None = None
    resume: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def check(self) -> tuple[ModelSpec, Task, WeightsSource | None]:
        """Checks everything that can be checked before any data is read or model built.

        Raises:
            QzError: naming the first bad value.
        """
        spec = get_model_spec(self.model)
        source = resolve_weights(self.weights, spec.weights_enum)
        self._check_numbers()
        check_device(self.device)
        for label, folder in (("--train", self.train), ("--val", self.val)):
            if not Path(folder).expanduser().is_dir():
                raise QzError(f"{label} {str(folder)!r} is not an existing folder.")
        out = check_output_dir(self.out, "--out")
        self._check_checkpoint(out / CHECKPOINT)
        return spec, get_task(spec.task), source

    def _check_numbers(self) -> None:
        for name in ("epochs", "batch_size", "lr_step", "freeze_observers_after"):
            if not getattr(self, name) >= 1:
                raise QzError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}.")
        for name in ("freeze_bn_after", "workers", "seed", "momentum", "weight_decay"):
            if not getattr(self, name) >= 0:  # NaN too
                raise QzError(f"--{name.replace('_', '-')} must be 0 or more; got {getattr(self, name)}.")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise QzError(f"--lr must be a positive number; got {self.lr}.")
        if not 0 < self.lr_gamma <= 1:
            raise QzError(f"--lr-gamma must be in (0, 1]; got {self.lr_gamma}.")
        if self.image_size is not None and self.image_size < 1:
            raise QzError(f"--image-size must be at least 1; got {self.image_size}.")

    def _check_checkpoint(self, path: Path) -> None:
        if self.resume and not path.is_file():
            raise QzError(f"--resume: {str(path)!r} does not exist; start without --resume.")
        if not self.resume and path.exists():
            raise QzError(
                f"--out {str(self.out)!r} holds a checkpoint of an earlier run: pass --resume to continue it, "
                "or choose another --out."
            )

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues, as plain values."""
        return json.loads(json.dumps({name: getattr(self, name) for name in RESUME_FIELDS}, default=str))


@dataclass(frozen=True)
class QatTrainingResult:
    """What a QAT training run wrote and how its epochs went."""

    out: Path
    history: list[dict[str, Any]]
    score_key: str
    best_epoch: int | None

    @property
    def best(self) -> Path:
        """The INT8 model of the best epoch (by the task's ``score_key``)."""
        return self.out / BEST_INT8

    @property
    def last(self) -> Path:
        """The INT8 model of the last epoch."""
        return self.out / LAST_INT8

    @property
    def checkpoint(self) -> Path:
        """The checkpoint a ``resume`` continues from."""
        return self.out / CHECKPOINT

    def summary(self) -> str:
        """A few lines for the terminal."""
        if not self.history:
            return f"No epochs trained; files in {self.out}"
        best = self.history[self.best_epoch - 1] if self.best_epoch else self.history[-1]
        return (
            f"best INT8 {self.score_key} {best['int8'][self.score_key]:.2f} at epoch {best['epoch']}: {self.best}\n"
            f"last INT8: {self.last}\ncheckpoint: {self.checkpoint}\nhistory: {self.out / HISTORY}"
        )


class TaskLoss(nn.Module):
    """``task.training_loss(model, batch)`` as a module, so DDP wraps any task's own loss and syncs its gradients."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> Tensor:
        return self.task.training_loss(self.model, batch)


def seed_all(*entropy: int) -> None:
    """Seeds Python, NumPy and PyTorch (CPU and CUDA) from non-negative integers (seed, epoch, rank)."""
    python_seed, numpy_seed = (int(s) for s in np.random.SeedSequence(list(entropy)).generate_state(2))
    random.seed(python_seed)
    np.random.seed(numpy_seed)
    torch.manual_seed(python_seed)


def set_freezing(model: nn.Module, epoch: int, config: QatTrainingConfig) -> tuple[bool, bool]:
    """Puts ``model`` in training mode and freezes observers and BatchNorm statistics as of ``epoch`` (0-based).

    Returns:
        (observers update, BatchNorm statistics frozen) for this epoch.
    """
    model.train()
    observing = epoch < config.freeze_observers_after
    model.apply(tq.enable_observer if observing else tq.disable_observer)
    bn_frozen = epoch >= config.freeze_bn_after
    if bn_frozen:
        model.apply(freeze_bn_stats)
    return observing, bn_frozen


@contextlib.contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Scoring must not move the observers' ranges: they are disabled in the block, then restored."""
    flags = {m: m.observer_enabled.clone() for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)}
    model.apply(tq.disable_observer)
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.observer_enabled.copy_(flag)


def train_epoch(
    step_model: nn.Module,
    batches: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    desc: str,
    progress: bool,
) -> float:
    """One pass of SGD over ``batches``; the mean loss over all processes' batches."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress)
    for batch in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = step_model(to_device(batch, device))
        if not torch.isfinite(loss):
            raise QzError(f"{desc}: the training loss is {loss.item()}; lower --lr or check the data.")
        loss.backward()
        optimizer.step()
        total += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if dist.is_initialized():
        dist.all_reduce(total)
    if total[1] == 0:
        raise QzError("QAT saw no batches: the training data is empty.")
    return float(total[0] / total[1])


def convert_copy(model: nn.Module) -> nn.Module:
    """An INT8 copy of the fake-quantized ``model``, converted on the CPU; ``model`` is left as it was."""
    return convert(copy.deepcopy(model).to("cpu"), inplace=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``train_qat_model``.

    Raises:
        QzError: the file is unreadable or not a qz QAT checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise unreadable_file("QAT checkpoint", path, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise QzError(f"{str(path)!r} is not a qz QAT checkpoint (written by qz train-qat).")
    return payload


def check_resume(checkpoint: dict[str, Any], config: QatTrainingConfig, path: Path) -> None:
    """Refuses to resume a checkpoint whose run had other settings."""
    saved = checkpoint.get("config", {})
    differ = [name for name, value in config.resume_key().items() if saved.get(name) != value]
    if differ:
        shown = ", ".join(f"{name} {saved.get(name)!r} (now {config.resume_key()[name]!r})" for name in differ)
        raise QzError(f"--resume: {str(path)!r} was trained with other settings: {shown}.")


@dataclass
class _Run:
    """The state of one training run, shared by its epochs."""

    config: QatTrainingConfig
    task: Task
    ranks: Ranks
    device: torch.device
    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: DistributedSampler
    train_batches: DataLoader
    val_batches: DataLoader | None
    score_key: str
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out).expanduser()

    def epoch(self, epoch: int) -> None:
        """Trains epoch ``epoch`` (0-based); rank 0 then scores, saves and reports it."""
        seed_all(self.config.seed, 1, epoch, self.ranks.rank)
        self.sampler.set_epoch(epoch)
        observing, bn_frozen = set_freezing(self.model, epoch, self.config)
        lr = self.optimizer.param_groups[0]["lr"]
        desc = f"epoch {epoch + 1}/{self.config.epochs}"
        progress = self.config.progress and self.ranks.main
        loss = train_epoch(
            self.step_model, self.train_batches, self.optimizer, self.device, desc=desc, progress=progress
        )
        self.scheduler.step()
        broadcast_buffers(self.model)
        if self.ranks.main:
            record = {"epoch": epoch + 1, "loss": loss, "lr": lr, "observers": observing, "bn_frozen": bn_frozen}
            self._score_and_save(record)
        if dist.is_initialized():
            dist.barrier()

    def _score_and_save(self, record: dict[str, Any]) -> None:
        key, progress = self.score_key, self.config.progress
        with observers_paused(self.model):
            batches = (to_device(batch, self.device) for batch in self.val_batches)
            record["fake_quant"] = plain_scores(self.task.score(self.model, batches, progress=progress))
            int8 = convert_copy(self.model)
        record["int8"] = plain_scores(self.task.score(int8, self.val_batches, progress=progress))
        if key not in record["int8"]:
            raise QzError(f"The {self.task.name} task's score has no {key!r}: {sorted(record['int8'])}.")
        score = float(record["int8"][key])
        record["best"] = self.best_score is None or score > self.best_score
        save_quantized(int8, self.out / LAST_INT8)
        if record["best"]:
            self.best_score, self.best_epoch = score, record["epoch"]
            save_quantized(int8, self.out / BEST_INT8)
        self.history.append(record)
        self._write_history()
        self._write_checkpoint(record["epoch"])
        tqdm.write(epoch_line(record, key, self.config.epochs))

    def _write_history(self) -> None:
        document = {
            "model": self.config.model,
            "score_key": self.score_key,
            "best_epoch": self.best_epoch,
            "epochs": self.history,
        }
        write_text_atomic(self.out / HISTORY, json.dumps(document, indent=1) + "\n")

    def _write_checkpoint(self, epochs_done: int) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "config": self.config.resume_key(),
            "world_size": self.ranks.world_size,
        }
        write_atomic(self.out / CHECKPOINT, lambda file: torch.save(payload, file))

    def restore(self, checkpoint: dict[str, Any]) -> int:
        """Loads a checkpoint's states; the number of epochs it had trained."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.history = list(checkpoint["history"])
        self.best_score, self.best_epoch = checkpoint["best_score"], checkpoint["best_epoch"]
        return int(checkpoint["epoch"])


def plain_scores(scores: dict[str, Any]) -> dict[str, float]:
    """A task's scores as plain floats (for JSON and the checkpoint)."""
    return {str(name): float(value) for name, value in scores.items()}


def epoch_line(record: dict[str, Any], key: str, epochs: int) -> str:
    """The log line of one epoch: training loss, learning rate, fake-quant and INT8 validation scores."""
    fake_quant, int8 = record["fake_quant"], record["int8"]
    line = (
        f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
        f"val {key} fake-quant {fake_quant.get(key, float('nan')):.2f}, INT8 {int8[key]:.2f}"
    )
    if "loss" in int8:
        line += f", INT8 val loss {int8['loss']:.4f}"
    return line + (" (best)" if record["best"] else "")


def _transform(config: QatTrainingConfig, spec: ModelSpec, task: Task, source: WeightsSource | None) -> Transform:
    if config.image_size is None:
        return task.transform(spec, source)
    return task.default_transform(replace(spec, input_size=(config.image_size, config.image_size), preprocess=None))


def _loader(
    task: Task, dataset: Dataset, config: QatTrainingConfig, device: torch.device, sampler: Any = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=task.collate,
        pin_memory=device.type == "cuda",
    )


def _build_run(
    config: QatTrainingConfig,
    spec: ModelSpec,
    task: Task,
    source: WeightsSource | None,
    ranks: Ranks,
    device: torch.device,
) -> _Run:
    transform = _transform(config, spec, task, source)
    train_data = task.training_data(spec, Path(config.train).expanduser(), transform)
    val_data = task.training_data(spec, Path(config.val).expanduser(), transform)
    sampler = DistributedSampler(train_data, ranks.world_size, ranks.rank, shuffle=True, seed=config.seed)
    seed_all(config.seed, 0)  # the same initial weights (random heads) on every rank
    builder = get_model_builder(spec.name)
    progress = config.progress and ranks.main
    model = builder(weights=source, progress=progress, quantize=True, is_qat=True, **config.model_kwargs).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    val_batches = _loader(task, val_data, config, device) if ranks.main else None
    train_batches = _loader(task, train_data, config, device, sampler)
    loss = TaskLoss(model, task)
    return _Run(
        config,
        task,
        ranks,
        device,
        model,
        loss,
        optimizer,
        scheduler,
        sampler,
        train_batches,
        val_batches,
        task.headline_key(spec),
    )


def _distribute(run: _Run) -> None:
    """Wraps the run's loss in DistributedDataParallel (after a resume has loaded the states)."""
    if run.ranks.distributed:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.step_model = DistributedDataParallel(run.step_model, device_ids=device_ids)


def train_qat_model(config: QatTrainingConfig) -> QatTrainingResult:
    """Trains ``config.model`` with QAT for ``config.epochs``, keeping the best and last INT8 models.

    Everything that can be checked is checked before any data is read; with ``config.resume`` the run
    continues from ``out/checkpoint.pt`` (every rank reads it) exactly where it stopped.

    Raises:
        QzError: bad settings, an unreadable or mismatched checkpoint, or data the task cannot read.
    """
    spec, task, source = config.check()
    ranks = launch_ranks()
    out = Path(config.out).expanduser()
    checkpoint = read_checkpoint(out / CHECKPOINT) if config.resume else None
    if checkpoint is not None:
        check_resume(checkpoint, config, out / CHECKPOINT)
    if source is None and ranks.main:
        warnings.warn(f"{spec.name}: no --weights given, so QAT starts from random weights.", stacklevel=2)
    device = training_device(config.device, ranks)
    with process_group(ranks, device):
        run = _build_run(config, spec, task, source, ranks, device)
        start = agreed_start(run.restore(checkpoint) if checkpoint else 0, ranks)
        _distribute(run)
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
        for epoch in range(start, config.epochs):
            run.epoch(epoch)
    return QatTrainingResult(out, run.history, run.score_key, run.best_epoch)
