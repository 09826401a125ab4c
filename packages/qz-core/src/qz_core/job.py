"""The whole jobs as one library call each: quantize (build, calibrate or QAT, convert, save, export, report),
predict (drawn pictures, FP32 beside INT8) and export (ONNX, checked in onnxruntime).

Every request is checked whole (names, weights, folders, numbers, output paths) before any model is built.
The ``qz`` command only parses arguments into these requests.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from qz_core.builder import ModelSpec, prepare_built, recipe_of
from qz_core.data import IMAGE_EXTENSIONS, image_files, read_rgb
from qz_core.errors import QzError, invalid_choice
from qz_core.files import atomic_path, check_output_dir, check_output_path
from qz_core.fusion import check_fuse_level
from qz_core.measure import measure_latency, model_size_mb
from qz_core.mixed_precision import Calibration, MixedPrecisionResult, Scorer, keep_float_until
from qz_core.onnx_export import OnnxReport, export_onnx
from qz_core.registry import get_model_builder, get_model_spec, get_task
from qz_core.task import Task, Transform
from qz_core.weights import WeightsSource, resolve_weights
from qz_core.workflow import calibrate, convert, load_quantized, save_quantized, train_qat

MODEL_SUFFIXES = (".pt", ".pth")
LATENCY_ROUNDS = 5
ONNX_SUFFIXES = (".onnx",)
EXPORT_FORMATS = {"onnx": ONNX_SUFFIXES, "openvino": (".xml",)}  # format -> output file suffixes


def _check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise QzError(f"--{name.replace('_', '-')} must be a positive number; got {value}.")


def _check_folder(path: Path | None, label: str) -> None:
    if path is not None and not Path(path).expanduser().is_dir():
        raise QzError(f"{label} {str(path)!r} is not an existing folder.")


def _warn_random(spec: ModelSpec, source: WeightsSource | None) -> None:
    if source is None:
        warnings.warn(
            f"{spec.name}: no --weights given, so its weights are random: the INT8 model will predict nothing useful.",
            stacklevel=3,
        )


@dataclass(frozen=True)
class QuantizeRequest:
    """One ``qz quantize`` job.

    Attributes:
        model: registered model name.
        out: INT8 model file to write (.pt).
        weights: enum weights name or checkpoint path; random weights (with a warning) when None.
        calib: calibration folder (PTQ; QAT calibrates on its training data).
        qat: quantization-aware training on ``train`` instead of calibration.
        train: labelled training folder for QAT, in a layout of the model's task.
        onnx: also export the INT8 model to this ONNX file.
        model_kwargs: the builder's own keywords (``num_classes``) and ``QuantOptions`` fields.
        max_drop: keep the most sensitive layers in float until the task metric on ``val`` is within this of FP32.
        val: labelled validation folder for ``max_drop``, in a training layout of the model's task.
    """

    model: str
    out: Path
    weights: str | None = None
    calib: Path | None = None
    qat: bool = False
    train: Path | None = None
    onnx: Path | None = None
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    workers: int = 0
    calib_batches: int | None = None
    calib_fraction: float | None = None
    opset: int = 13
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    latency: bool = True
    progress: bool = True
    max_drop: float | None = None
    val: Path | None = None

    def check(self) -> tuple[ModelSpec, Task, WeightsSource | None]:
        """Checks everything that can be checked before a model is built.

        Raises:
            QzError: naming the first bad value.
        """
        spec = get_model_spec(self.model)
        source = resolve_weights(self.weights, spec.weights_enum)
        _check_positive(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, calib_batches=self.calib_batches)
        if self.workers < 0:
            raise QzError(f"--workers must be 0 or more; got {self.workers}.")
        if self.calib_fraction is not None and not 0 < self.calib_fraction <= 1:
            raise QzError(f"--calib-fraction must be in (0, 1]; got {self.calib_fraction}.")
        if self.calib_batches is not None and self.calib_fraction is not None:
            raise QzError("Pass --calib-batches or --calib-fraction, not both.")
        if self.qat and self.train is None:
            raise QzError(f"--qat needs --train DIR: {get_task(spec.task).training_layouts}.")
        if not self.qat and self.calib is None:
            raise QzError(f"Post-training quantization needs --calib DIR: {get_task(spec.task).calibration_layouts}.")
        _check_folder(self.calib, "--calib")
        _check_folder(self.train, "--train")
        self._check_max_drop(spec)
        check_fuse_level(self.model_kwargs.get("fuse_level", "all"))
        out = check_output_path(self.out, "--out", MODEL_SUFFIXES)
        outputs = [out] + ([check_output_path(self.onnx, "--onnx", ONNX_SUFFIXES)] if self.onnx else [])
        if self.onnx and outputs[0].resolve() == outputs[1].resolve():
            raise QzError(f"--out and --onnx are the same file {str(self.out)!r}.")
        if (
            source is not None
            and source.path is not None
            and any(o.resolve() == source.path.resolve() for o in outputs)
        ):
            raise QzError(f"An output would overwrite the weights file {str(source.path)!r}.")
        return spec, get_task(spec.task), source

    def _check_max_drop(self, spec: ModelSpec) -> None:
        if self.max_drop is None:
            if self.val is not None:
                raise QzError("--val is the validation folder of --max-drop: pass --max-drop too.")
            return
        if not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise QzError(f"--max-drop must be a number >= 0 (the allowed metric drop); got {self.max_drop}.")
        if self.val is None:
            raise QzError(f"--max-drop needs --val DIR, labelled: {get_task(spec.task).training_layouts}.")
        if self.qat:
            raise QzError("--max-drop chooses float layers for post-training quantization: drop --qat.")
        _check_folder(self.val, "--val")


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantize job made and measured."""

    model: str
    out: Path
    fp32_mb: float
    int8_mb: float
    batches: int
    qat_losses: list[float]
    fp32_ms: float | None = None
    int8_ms: float | None = None
    onnx: OnnxReport | None = None
    mixed: MixedPrecisionResult | None = None

    def summary(self) -> str:
        """A few lines for the terminal."""
        how = f"QAT, {len(self.qat_losses)} epoch(s), loss {self.qat_losses[-1]:.4f}" if self.qat_losses else "PTQ"
        lines = [
            f"{self.model}: INT8 ({how}, {self.batches} batches) saved to {self.out}",
            f"size: {self.int8_mb:.2f} MB INT8 vs {self.fp32_mb:.2f} MB FP32 ({self.int8_mb / self.fp32_mb:.2f}x)",
        ]
        if self.fp32_ms is not None and self.int8_ms is not None:
            lines.append(
                f"latency (eager, batch 1, median of {LATENCY_ROUNDS}): {self.int8_ms:.1f} ms INT8 "
                f"vs {self.fp32_ms:.1f} ms FP32 ({self.int8_ms / self.fp32_ms:.2f}x)"
            )
        if self.onnx is not None:
            lines.append(str(self.onnx))
        if self.mixed is not None:
            lines.append(self.mixed.summary())
        return "\n".join(lines)


def _loader(task: Task, dataset: Any, batch_size: int, workers: int, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=task.collate)


def _request_data(request: QuantizeRequest, spec: ModelSpec, task: Task, transform: Transform) -> DataLoader:
    """The training (QAT) or calibration batches of a request, in the task's layouts."""
    if request.qat:
        dataset = task.training_data(spec, request.train, transform)
    else:
        dataset = task.calibration_data(spec, request.calib, transform)
    return _loader(task, dataset, request.batch_size, request.workers, shuffle=request.qat)


def _single_input(task: Task, loader: DataLoader) -> Any:
    """The model input of the first sample alone (batch 1): a real image for latency and export."""
    first = next(iter(loader.dataset))
    return task.model_inputs(task.collate([first]))


def _example_tensor(task: Task, spec: ModelSpec, inputs: Any) -> Any:
    return inputs if isinstance(inputs, torch.Tensor) else task.example_input(spec)


def quantize_model(request: QuantizeRequest) -> QuantizeResult:
    """Builds, calibrates (or trains with QAT), converts and saves one INT8 model, and exports and measures it."""
    spec, task, source = request.check()
    _warn_random(spec, source)
    data = _request_data(request, spec, task, task.transform(spec, source))
    sample = _single_input(task, data)  # reads a first image before any model is built
    float_model = get_model_builder(spec.name)(weights=source, progress=request.progress, **request.model_kwargs)
    fp32_mb = model_size_mb(float_model)
    fp32_ms = _latency(float_model, sample) if request.latency else None
    mixed = _keep_float_layers(request, spec, task, source, float_model, data) if request.max_drop is not None else None
    kept = {"float_modules": (*recipe_of(float_model).options.float_modules, *mixed.float_layers)} if mixed else {}
    model = prepare_built(copy.deepcopy(float_model) if request.latency else float_model, is_qat=request.qat, **kept)
    losses: list[float] = []
    if request.qat:
        losses = train_qat(
            model, data, step_loss=task.training_loss, epochs=request.epochs, lr=request.lr, progress=request.progress
        )
        batches = len(data) * request.epochs
    else:
        batches = calibrate(
            model,
            data,
            num_batches=request.calib_batches,
            fraction=request.calib_fraction,
            progress=request.progress,
            inputs=task.model_inputs,
        )
    int8 = convert(model)
    save_quantized(int8, request.out)
    report = None
    if request.onnx is not None:
        example = _example_tensor(task, spec, sample)
        report = export_onnx(task.export_module(int8), request.onnx, example, opset=request.opset)
    int8_ms = _latency(int8, sample) if request.latency else None
    return QuantizeResult(
        spec.name, Path(request.out), fp32_mb, model_size_mb(int8), batches, losses, fp32_ms, int8_ms, report, mixed
    )


def _keep_float_layers(
    request: QuantizeRequest,
    spec: ModelSpec,
    task: Task,
    source: WeightsSource | None,
    float_model: nn.Module,
    data: DataLoader,
) -> MixedPrecisionResult:
    """The layers ``--max-drop`` keeps in float (``mixed_precision.keep_float_until`` on ``--val``)."""
    val = task.training_data(spec, request.val, task.transform(spec, source))
    batches = _loader(task, val, request.batch_size, request.workers, shuffle=False)
    example = task.model_inputs(task.collate([val[0]]))
    calibration = Calibration(data, request.calib_batches, request.calib_fraction)
    _, result = keep_float_until(
        float_model,
        calibration,
        Scorer(task, batches, example, task.headline_key(spec)),
        request.max_drop,
        progress=request.progress,
    )
    return result


def _latency(model: nn.Module, inputs: Any) -> float:
    return measure_latency(model, inputs, warmup=1, rounds=LATENCY_ROUNDS).median_ms


@dataclass(frozen=True)
class ModelSource:
    """A model to run: a registered name with weights (FP32), an INT8 file, or both (side by side)."""

    model: str | None = None
    weights: str | None = None
    int8: Path | None = None

    def check(self) -> tuple[ModelSpec, WeightsSource | None]:
        """The model's spec and weights; an INT8 file must exist and name the same model."""
        if self.model is None and self.int8 is None:
            raise QzError("Name a model (with --weights) or pass --int8 FILE.")
        if self.int8 is not None and not Path(self.int8).expanduser().is_file():
            raise QzError(f"--int8 {str(self.int8)!r} is not an existing file.")
        if self.model is None:
            return get_model_spec(recipe_of(load_quantized(self.int8)).name), None
        spec = get_model_spec(self.model)
        return spec, resolve_weights(self.weights, spec.weights_enum)

    def load(self, spec: ModelSpec, source: WeightsSource | None, **kwargs: Any) -> dict[str, nn.Module]:
        """'FP32' and/or 'INT8' models, in that order."""
        models: dict[str, nn.Module] = {}
        if self.int8 is None or self.weights is not None:
            _warn_random(spec, source)
            models["FP32"] = get_model_builder(spec.name)(weights=source, **kwargs).eval()
        if self.int8 is not None:
            int8 = load_quantized(self.int8)
            if recipe_of(int8).name != spec.name:
                raise QzError(f"--int8 {str(self.int8)!r} holds {recipe_of(int8).name!r}, not {spec.name!r}.")
            models["INT8"] = int8
        return models


def _image_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += image_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise QzError(f"Image {str(path)!r} does not exist.")
    if not files:
        raise QzError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}.")
    return files


def _side_by_side(panels: Sequence[Image.Image]) -> Image.Image:
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (sum(p.width for p in panels), height), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    return canvas


def predict_images(source: ModelSource, images: Sequence[Path], out_dir: Path, **model_kwargs: Any) -> list[Path]:
    """Draws each model's prediction on each image; one PNG per image (FP32 and INT8 side by side when both).

    Returns:
        The PNG files written.
    """
    spec, weights = source.check()
    files = _image_files(images)
    out = check_output_dir(out_dir, "--out")
    task = get_task(spec.task)
    models = source.load(spec, weights, **model_kwargs)
    transform = task.transform(spec, weights)
    names = task.class_names(spec, weights, next(iter(models.values())))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        image = read_rgb(path)
        panels = [
            task.draw(image, task.predict(model, [image], transform)[0], names, f"{spec.name} {label}")
            for label, model in models.items()
        ]
        target = out / f"{path.stem}_{spec.name}.png"
        with atomic_path(target) as tmp:
            _side_by_side(panels).save(tmp, format="PNG")
        written.append(target)
    return written


def _export_openvino(model: nn.Module, xml_path: Path, example: Any, opset: int) -> Any:
    """ONNX export into a temporary folder (checked in onnxruntime), then OpenVINO IR from it."""
    import tempfile

    from qz_core.openvino_runtime import write_openvino_ir

    with tempfile.TemporaryDirectory(prefix="qz-export-") as work:
        onnx_report = export_onnx(model, Path(work) / f"{xml_path.stem}.onnx", example, opset=opset)
        return write_openvino_ir(onnx_report.path, xml_path, example, quantized=onnx_report.quantized)


def export_model(
    source: ModelSource, out: Path, *, opset: int = 13, format: str = "onnx", **model_kwargs: Any
) -> list[Any]:
    """Exports the FP32 and/or INT8 model to ONNX or OpenVINO IR, checking each file runs and agrees.

    ONNX files are checked in onnxruntime against PyTorch (``OnnxReport``); OpenVINO IR (``format``
    "openvino": ``out`` is the .xml, the .bin goes beside it) is converted from that ONNX export and
    checked in OpenVINO against onnxruntime (``OpenVinoReport``). With both models, the INT8 file
    gets ``_int8`` before its suffix.

    Raises:
        QzError: an unknown format, a bad output path, or OpenVINO not installed, before any model is built.
    """
    if format not in EXPORT_FORMATS:
        raise invalid_choice("export format", format, EXPORT_FORMATS)
    spec, weights = source.check()
    target = check_output_path(out, "--out", EXPORT_FORMATS[format])
    if format == "openvino":
        from qz_core.openvino_runtime import import_openvino

        import_openvino()
    task = get_task(spec.task)
    models = source.load(spec, weights, **{**spec.probe_kwargs, **model_kwargs})
    example = task.example_input(spec)
    reports = []
    for label, model in models.items():
        path = target.with_name(f"{target.stem}_int8{target.suffix}") if label == "INT8" and len(models) > 1 else target
        if format == "openvino":
            reports.append(_export_openvino(task.export_module(model), path, example, opset))
        else:
            reports.append(export_onnx(task.export_module(model), path, example, opset=opset))
    return reports
