"""Support results: ``SupportResult`` (one row of the support table) and its JSON file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qz_core.errors import QzError
from qz_core.files import write_text_atomic


@dataclass
class SupportResult:
    """One row of the support table; a failed step holds its error message in ``errors``.

    Attributes:
        name: the model.
        task: its task.
        ptq: calibrate, convert and an INT8 forward worked on the first engine.
        qat: QAT steps on the task's loss, convert and an INT8 forward worked.
        engines: engine -> whether the converted model ran on it.
        fp32_onnx: the FP32 export module went to ONNX and ran in onnxruntime.
        int8_onnx: the INT8 export module went to ONNX and ran in onnxruntime.
        opset: the ONNX opset used.
        float_islands: parts the INT8 model runs in float.
        int8_max_diff: largest |INT8 - FP32| of PyTorch's outputs (first engine).
        int8_sqnr: engine -> signal-to-quantization-noise ratio (dB) of PyTorch's INT8 outputs against FP32.
        unrelated_sqnr: the same ratio for the FP32 output of another random input: what an INT8 output that
            has lost the input would score.
        onnx_max_diff: largest |onnxruntime INT8 - PyTorch INT8|.
        onnx_fp32_diff: largest |onnxruntime INT8 - PyTorch FP32|.
        output_range: largest max - min of the FP32 outputs (the scale of the differences).
        errors: step -> one-line error message.
    """

    name: str
    task: str
    ptq: bool = False
    qat: bool = False
    engines: dict[str, bool] = field(default_factory=dict)
    fp32_onnx: bool = False
    int8_onnx: bool = False
    opset: int = 13
    float_islands: int | None = None
    int8_max_diff: float | None = None
    int8_sqnr: dict[str, float] = field(default_factory=dict)
    unrelated_sqnr: float | None = None
    onnx_max_diff: float | None = None
    onnx_fp32_diff: float | None = None
    output_range: float | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, as support.json stores them."""
        return asdict(self)


def write_support_json(
    results: list[SupportResult], path: str | os.PathLike, meta: dict[str, Any] | None = None
) -> Path:
    """Writes the rows and ``meta`` as JSON; returns the path."""
    payload = {"meta": meta or {}, "rows": [r.as_dict() for r in results]}
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    return Path(path)


def read_support_json(path: str | os.PathLike) -> tuple[list[SupportResult], dict[str, Any]]:
    """The rows and metadata of a ``support.json`` that ``write_support_json`` wrote.

    Raises:
        QzError: the file is missing or is not a qz support result.
    """
    path = Path(path)
    if not path.is_file():
        raise QzError(
            f"No support result at {path}: run 'qz support ... --out DIR' first (it writes DIR/support.json)."
        )
    try:
        payload = json.loads(path.read_text())
        return [SupportResult(**row) for row in payload["rows"]], payload.get("meta", {})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise QzError(f"{path} is not a qz support result ({type(exc).__name__}: {exc}).") from None
