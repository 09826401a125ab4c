"""What every task's evaluation (``qz eval TASK``) checks the same way before it scores anything."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, ClassVar

from torch import nn

from qz_core.builder import ModelSpec, recipe_of
from qz_core.errors import QzError, invalid_choice
from qz_core.registry import get_model_spec
from qz_core.workflow import load_quantized

# How an evaluation gets its INT8 model besides loading a file: None (FP32 only) or post-training quantization.
QUANTIZE_MODES = (None, "ptq")


def check_eval_options(quantize: str | None, int8: str | os.PathLike | None, **counts: int | None) -> None:
    """Checks the FP32-vs-INT8 options: a known quantize mode, not both PTQ and an INT8 file, counts >= 1.

    Raises:
        QzError: naming the bad value.
    """
    if quantize not in QUANTIZE_MODES:
        raise invalid_choice("quantize mode", quantize, [m for m in QUANTIZE_MODES if m])
    if quantize and int8 is not None:
        raise QzError("Pass quantize='ptq' (quantize the float model here) or an INT8 model file, not both.")
    for label, value in counts.items():
        if value is not None and value < 1:
            raise QzError(f"{label} must be at least 1; got {value}.")


def resolve_eval_model(
    model: str | None, int8: str | os.PathLike | None, task: str, caller: str
) -> tuple[str, ModelSpec, nn.Module | None]:
    """The model name, its spec and the loaded INT8 model (None without ``int8``).

    Raises:
        QzError: no name, an INT8 file holding another model, an unknown name, or a model of another task.
    """
    int8_model = None
    if int8 is not None:
        int8_model = load_quantized(int8)
        saved = recipe_of(int8_model).name
        if model is not None and model != saved:
            raise QzError(f"The INT8 model file {os.fspath(int8)!r} holds {saved!r}, not {model!r}.")
        model = saved
    if model is None:
        raise QzError("Name the model to evaluate (or pass an INT8 model file, which names it).")
    spec = get_model_spec(model)
    if spec.task != task:
        raise QzError(f"{caller} takes a {task} model; {model!r} is a {spec.task} model.")
    return model, spec, int8_model


class TimedScores:
    """Mixin for a dataclass of one precision's scores with ``images`` and ``seconds`` fields."""

    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput of the evaluation loop (data loading included)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


class Fp32Int8Result:
    """Mixin for a dataclass holding ``fp32`` and ``int8`` scores: INT8 - FP32 per metric, a table, and JSON.

    The subclass names its metrics (attributes of its scores) in ``METRICS``, the table's columns in
    ``COLUMNS`` (title, score attribute, format), the metrics whose INT8 - FP32 delta the table shows in
    ``DELTAS`` (title, metric, format), and the lines above the table in ``heading``.
    """

    METRICS: ClassVar[tuple[str, ...]] = ()
    COLUMNS: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    DELTAS: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    fp32: Any
    int8: Any
    int8_source: str | None
    backend: str | None
    calibration: str | None

    def heading(self) -> list[str]:
        """What was evaluated, on what (the lines above the table)."""
        return []

    def table(self) -> str:
        """The result as a text table: one row per precision, INT8 - FP32 deltas, images per second."""
        columns = [*self.COLUMNS, *((t, "", f) for t, _, f in self.DELTAS), ("img/s", "images_per_second", ".2f")]
        widths = [max(8, len(title) + 2) for title, _, _ in columns]
        lines = self.heading() + ([f"calibration: {self.calibration}"] if self.calibration else [])
        header = f"{'model':<18}" + "".join(f"{title:>{w}}" for (title, _, _), w in zip(columns, widths, strict=True))
        lines += ["", header, "-" * len(header)]
        int8_name = f"INT8 {self.int8_source or ''} {self.backend or ''}".strip()
        for name, scores in (("FP32", self.fp32), (int8_name, self.int8)):
            if scores is None:
                continue
            delta = self.delta if scores is self.int8 else None
            cells = [format(getattr(scores, attr), fmt) for _, attr, fmt in self.COLUMNS]
            cells += [format(delta[metric], "+" + fmt) if delta else "-" for _, metric, fmt in self.DELTAS]
            cells.append(format(scores.images_per_second, ".2f"))
            lines.append(f"{name:<18}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True)))
        return "\n".join(lines)

    @property
    def delta(self) -> dict[str, float] | None:
        """INT8 minus FP32 per metric (in the metric's own unit); None unless both were evaluated."""
        if self.fp32 is None or self.int8 is None:
            return None
        return {k: getattr(self.int8, k) - getattr(self.fp32, k) for k in self.METRICS}

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return asdict(self) | {"delta": self.delta}  # type: ignore[call-overload]
