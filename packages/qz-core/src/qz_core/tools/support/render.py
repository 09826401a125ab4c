"""The support table in markdown, and every support output file at once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qz_core.files import write_text_atomic
from qz_core.tools.markdown import notes, table, yes_no
from qz_core.tools.support.probe import DEFAULT_ENGINES
from qz_core.tools.support.results import SupportResult, write_support_json


def support_markdown(results: Sequence[SupportResult]) -> str:
    """The support table, from what ``probe_model`` actually ran, with error notes."""
    engines = [e for e in DEFAULT_ENGINES if any(e in r.engines for r in results)]
    engines += sorted({e for r in results for e in r.engines} - set(engines))
    header = ["Model", "Quantization Support (PTQ, QAT)", *engines, "FP32 ONNX", "INT8 ONNX", "ONNX opset"]
    header += ["float islands"]
    body = []
    for r in results:
        quant = ", ".join(k for k, ok in (("PTQ", r.ptq), ("QAT", r.qat)) if ok) or "N"
        cells = [r.name, quant, *(yes_no(r.engines.get(e)) for e in engines), yes_no(r.fp32_onnx)]
        cells += [yes_no(r.int8_onnx), str(r.opset) if r.fp32_onnx or r.int8_onnx else "N/A"]
        cells += ["-" if r.float_islands is None else str(r.float_islands)]
        body.append(cells)
    lines = table(header, body)
    lines += notes("Errors:", [(r.name, f"{k}: {v}") for r in results for k, v in r.errors.items()])
    return "\n".join(lines) + "\n"


def write_support_outputs(
    results: Sequence[SupportResult], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Writes support.json and support.md; returns the paths."""
    out = Path(out_dir)
    results = list(results)
    paths = {"json": write_support_json(results, out / "support.json", meta), "markdown": out / "support.md"}
    write_text_atomic(paths["markdown"], support_markdown(results))
    return paths
