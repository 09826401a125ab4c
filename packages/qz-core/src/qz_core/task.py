"""The typed task contract: the one object through which core knows a task package.

A task package subclasses ``Task`` once and names the instance under the ``qz.tasks`` entry point.
Core asks it how to read calibration and training folders, how to batch images of different sizes,
the QAT loss, the module that goes to ONNX, how to predict and draw, and how ``qz eval`` scores it.
What a model family does differently (its own loss, its own decoding) lives on its model class,
behind a protocol the task package defines.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from qz_core.builder import ModelSpec
from qz_core.weights import WeightsSource
from qz_core.workflow import estimate_bn_stats

Transform = Callable[[Image.Image], Any]


class Task(ABC):
    """One task's adapter.

    Attributes:
        name: the task's name in ``qz list --task``, ``qz eval NAME`` and ``ModelSpec.task``.
        metric: what ``qz eval`` reports (for help texts and tables).
        calibration_layouts: the calibration folder layouts it reads, for help texts and errors.
        training_layouts: the labelled folder layouts QAT reads, for help texts and errors.
        score_key: the key of ``score``'s headline metric (higher is better); see ``headline_key``.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    calibration_layouts: ClassVar[str]
    training_layouts: ClassVar[str]
    score_key: ClassVar[str]

    def transform(self, spec: ModelSpec, source: WeightsSource | None) -> Transform:
        """The input transform of ``spec``: its enum weights' own, else the spec's, else the task's."""
        if source is not None and source.enum_member is not None:
            return source.enum_member.transforms()
        if spec.preprocess is not None:
            return spec.preprocess()
        return self.default_transform(spec)

    @abstractmethod
    def default_transform(self, spec: ModelSpec) -> Transform:
        """The transform of a model whose weights and spec name none."""

    @abstractmethod
    def calibration_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """Unlabelled samples for calibration from ``folder`` (any of ``calibration_layouts``)."""

    @abstractmethod
    def training_data(self, spec: ModelSpec, folder: Path, transform: Transform) -> Dataset:
        """(input, target) samples for QAT from ``folder`` (any of ``training_layouts``)."""

    def collate(self, samples: Sequence[Any]) -> Any:
        """Batches samples; a task whose images differ in size overrides it."""
        return default_collate(list(samples))

    def model_inputs(self, batch: Any) -> Any:
        """What the model is called with for a batch (the inputs of (inputs, targets))."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0]
        return batch

    @abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The QAT loss of one (inputs, targets) batch on a model in training mode."""

    @abstractmethod
    def score(self, model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> dict[str, float]:
        """The task's metrics of ``model`` (float, prepared or INT8) over labelled batches.

        ``batches`` are ``collate``d samples of ``training_data`` (a validation folder in a training
        layout). The result holds ``headline_key(spec)`` and, where the task computes one on any model,
        ``"loss"`` (its evaluation loss, lower is better). The model is put in eval mode.
        """

    def headline_key(self, spec: ModelSpec) -> str:
        """The key of ``score``'s headline metric for models of ``spec`` (``score_key`` unless a family differs)."""
        return self.score_key

    def export_module(self, model: nn.Module) -> nn.Module:
        """The module that goes to ONNX (the deployable part of ``model``)."""
        return model

    def example_input(self, spec: ModelSpec, batch_size: int = 1) -> Any:
        """A random input of the model's size, for exports and timing."""
        return torch.rand(batch_size, 3, *spec.input_size)

    @abstractmethod
    def example_training_batch(self, spec: ModelSpec, batch_size: int = 2) -> Any:
        """A random (inputs, targets) batch that ``training_loss`` takes, for probes and tests."""

    def settle_random_weights(self, model: nn.Module, inputs: Sequence[Any]) -> None:
        """Makes a random-weight float model's activations realistic (BatchNorm statistics from ``inputs``).

        Benchmarks and support probes run random weights; a task whose models need more (heads
        initialized near zero) overrides it.
        """
        estimate_bn_stats(model, inputs)

    def class_names(self, spec: ModelSpec, source: WeightsSource | None, model: nn.Module) -> list[str] | None:
        """Names of the model's classes: its weights' categories, or names the model carries."""
        if source is not None and source.meta.get("categories"):
            return list(source.meta["categories"])
        names = getattr(model, "class_names", None)
        return list(names) if names else None

    @abstractmethod
    def predict(self, model: nn.Module, images: Sequence[Image.Image], transform: Transform) -> list[Any]:
        """One prediction per image (the task's own type), in the image's own coordinates."""

    @abstractmethod
    def draw(self, image: Image.Image, prediction: Any, class_names: Sequence[str] | None, title: str) -> Image.Image:
        """A picture of ``prediction`` on ``image``, titled ``title``."""

    @abstractmethod
    def add_eval_command(self, parser: argparse.ArgumentParser) -> None:
        """Fills in ``qz eval NAME``'s parser (its options and ``func``)."""

    def add_demo_command(self, parser: argparse.ArgumentParser) -> bool:
        """Fills in ``qz demo --task NAME``'s options and ``func``; False when the task has no demo."""
        return False
