"""Benchmark results: ``BenchRow`` (one model's measurements), and its JSON and CSV files."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qz_core.errors import QzError
from qz_core.files import write_text_atomic
from qz_core.measure import Latency
from qz_core.tools.ort_tools import ORT_OWN

# What is timed, in the order of the table columns: key -> column label.
RUNNERS = {
    "fp32": "FP32 eager",
    "int8": "INT8 eager",
    "ort_fp32": "ORT FP32",
    "ort_int8": "ORT INT8",
    "tv_int8": "torchvision INT8",
    "ort_s8s8": "ORT own S8S8",
    "ort_u8s8_qdq": "ORT own U8S8 QDQ",
    "ort_u8s8_qop": "ORT own U8S8 QOperator",
    "ov_fp32": "OpenVINO FP32",
    "ov_int8": "OpenVINO INT8",
    "nncf_int8": "NNCF INT8 (OpenVINO)",
}
# The INT8 deployments the deployed ratio takes the fastest of (the runtimes only where they ran the whole model).
INT8_RUNTIMES = ("ort_int8", "ov_int8")
FP32_RUNTIMES = ("ort_fp32", "ov_fp32")
# An INT8 model above this share of the fastest FP32 runtime's latency is not worth deploying.
WORTH_DEPLOYING = 0.7
# A row is busy when other processes kept more than this many cores busy, on average, while it was timed
# (or, where that cannot be read, when the 1-minute load average exceeded the bench's threads by as much).
BUSY_OTHER_CORES = 0.5

NO_TORCHVISION_MODEL = "torchvision has no quantizable model of this name"

_SIZES = ("fp32_mb", "int8_mb", "fp32_onnx_mb", "int8_onnx_mb", "peak_rss_mb", "start_rss_mb")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def is_busy(load_average: float | None, other_cores: float | None, threads: int) -> bool:
    """Whether other work competed with a model's timing (see ``BUSY_OTHER_CORES``)."""
    if other_cores is not None:
        return other_cores > BUSY_OTHER_CORES
    return load_average is not None and load_average > threads + BUSY_OTHER_CORES


@dataclass
class BenchRow:
    """One model's measurements; ``error`` is set when it could not be quantized or timed.

    ``ort_partial`` is True when the ONNX runtimes (onnxruntime, OpenVINO) ran the task's export
    module (a detector's dense network) rather than the whole model: their times then stay out of
    the deployed ratio. ``ov_int8_precision`` says what OpenVINO's INT8 compute layers run in
    (``"u8 53, f32 1"``): integers in a real INT8 graph; ``nncf_int8_precision`` the same of NNCF's model.
    ``load_average`` (1-minute, before timing) and ``other_cores`` (cores other processes kept busy
    while timing) say whether the machine was quiet; ``busy`` is the verdict of ``is_busy``.
    """

    model: str
    task: str = ""
    family: str = ""
    backend: str = ""
    batch_size: int = 1
    input_size: tuple[int, int] = (224, 224)
    latency: dict[str, Latency] = field(default_factory=dict)
    fp32_mb: float | None = None
    int8_mb: float | None = None
    fp32_onnx_mb: float | None = None
    int8_onnx_mb: float | None = None
    peak_rss_mb: float | None = None
    start_rss_mb: float | None = None
    float_islands: int | None = None
    seconds: float | None = None
    error: str | None = None
    notes: dict[str, str] = field(default_factory=dict)
    target: float = 1.0
    hotspots: dict[str, str] = field(default_factory=dict)
    ort_partial: bool = False
    ov_int8_precision: str | None = None
    nncf_int8_precision: str | None = None
    load_average: float | None = None
    other_cores: float | None = None
    busy: bool = False

    def ms(self, key: str) -> float | None:
        """Median latency of runner ``key`` (see ``RUNNERS``) in ms, None if not timed."""
        return self.latency[key].median_ms if key in self.latency else None

    @property
    def eager_ratio(self) -> float | None:
        """INT8 eager / FP32 eager (below 1 means INT8 is faster)."""
        return _ratio(self.ms("int8"), self.ms("fp32"))

    @property
    def deployed_ratio(self) -> float | None:
        """min(INT8 eager, ORT INT8, OpenVINO INT8) / FP32 eager: the best INT8 deployment against the FP32 baseline."""
        return _ratio(self._fastest("int8", INT8_RUNTIMES), self.ms("fp32"))

    def _fastest(self, eager: str, runtimes: tuple[str, ...]) -> float | None:
        candidates = (eager,) if self.ort_partial else (eager, *runtimes)
        times = [t for t in map(self.ms, candidates) if t is not None]
        return min(times) if times else None

    @property
    def int8_vs_fastest_fp32(self) -> float | None:
        """The fastest INT8 deployment over the fastest FP32 one (eager, onnxruntime, OpenVINO alike)."""
        return _ratio(self._fastest("int8", INT8_RUNTIMES), self._fastest("fp32", FP32_RUNTIMES))

    @property
    def worth_deploying(self) -> bool | None:
        """Whether the fastest INT8 takes at most ``WORTH_DEPLOYING`` of the fastest FP32 runtime's time."""
        ratio = self.int8_vs_fastest_fp32
        return None if ratio is None else ratio <= WORTH_DEPLOYING

    @property
    def meets_target(self) -> bool | None:
        """Whether the deployed ratio is at most the model's target (None when not measured)."""
        ratio = self.deployed_ratio
        return None if ratio is None else ratio <= self.target

    @property
    def slower_than_torchvision(self) -> bool | None:
        """Whether qz's INT8 eager is slower than torchvision's beyond noise (its p10 above their p90)."""
        if "int8" not in self.latency or "tv_int8" not in self.latency:
            return None
        return self.latency["int8"].p10_ms > self.latency["tv_int8"].p90_ms

    @property
    def ort_ratio(self) -> float | None:
        """ORT INT8 / ORT FP32."""
        return _ratio(self.ms("ort_int8"), self.ms("ort_fp32"))

    @property
    def ov_ratio(self) -> float | None:
        """OpenVINO INT8 / OpenVINO FP32."""
        return _ratio(self.ms("ov_int8"), self.ms("ov_fp32"))

    @property
    def qz_int8_ms(self) -> float | None:
        """qz's fastest INT8 of the same work NNCF's model does (the ONNX runtimes only, where they ran part of it)."""
        if not self.ort_partial:
            return self._fastest("int8", INT8_RUNTIMES)
        times = [t for t in map(self.ms, INT8_RUNTIMES) if t is not None]
        return min(times) if times else None

    @property
    def nncf_ratio(self) -> float | None:
        """qz's fastest INT8 / NNCF's INT8 in OpenVINO (above 1 means qz is slower)."""
        return _ratio(self.qz_int8_ms, self.ms("nncf_int8"))

    @property
    def torchvision_ratio(self) -> float | None:
        """qz INT8 eager / torchvision INT8 eager (below 1 means qz's model is faster)."""
        return _ratio(self.ms("int8"), self.ms("tv_int8"))

    @property
    def ort_u8s8_key(self) -> str | None:
        """The faster of the timed ORT own U8S8 formats ("ort_u8s8_qdq" or "ort_u8s8_qop"), None if neither ran."""
        timed = [k for k in ("ort_u8s8_qdq", "ort_u8s8_qop") if k in self.latency]
        return min(timed, key=self.ms) if timed else None

    @property
    def ort_u8s8_format(self) -> str | None:
        """The format of the faster ORT own U8S8 file: "QDQ" or "QOperator"."""
        key = self.ort_u8s8_key
        return None if key is None else ORT_OWN[key][3]

    @property
    def ort_own_best_ms(self) -> float | None:
        """The fastest of onnxruntime's own INT8 files (S8S8 and U8S8 in either format), median ms."""
        timed = [self.ms(k) for k in ORT_OWN if k in self.latency]
        return min(timed) if timed else None

    @property
    def ort_own_ratio(self) -> float | None:
        """qz's ORT INT8 / the best ORT own INT8 (at most 1: qz's INT8 ONNX is at least as fast)."""
        return _ratio(self.ms("ort_int8"), self.ort_own_best_ms)

    @property
    def size_ratio(self) -> float | None:
        """INT8 / FP32 state-dict size."""
        return _ratio(self.int8_mb, self.fp32_mb)

    def as_dict(self) -> dict[str, Any]:
        """A flat record (one CSV row): medians and p10/p90 per runner, ratios, sizes, errors."""
        record: dict[str, Any] = {
            "model": self.model,
            "task": self.task,
            "family": self.family,
            "backend": self.backend,
            "batch_size": self.batch_size,
            "input_h": self.input_size[0],
            "input_w": self.input_size[1],
        }
        for key in RUNNERS:
            lat = self.latency.get(key)
            record[f"{key}_ms"] = lat.median_ms if lat else None
            record[f"{key}_p10_ms"] = lat.p10_ms if lat else None
            record[f"{key}_p90_ms"] = lat.p90_ms if lat else None
        own_ratio = self.ort_own_ratio
        record |= {
            "eager_ratio": self.eager_ratio,
            "deployed_ratio": self.deployed_ratio,
            "int8_vs_fastest_fp32": self.int8_vs_fastest_fp32,
            "worth_deploying": self.worth_deploying,
            "target": self.target,
            "meets_target": self.meets_target,
            "slower_than_torchvision": self.slower_than_torchvision,
            "ort_ratio": self.ort_ratio,
            "ort_partial": self.ort_partial,
            "ov_ratio": self.ov_ratio,
            "ov_int8_precision": self.ov_int8_precision,
            "nncf_int8_precision": self.nncf_int8_precision,
            "qz_int8_ms": self.qz_int8_ms,
            "nncf_ratio": self.nncf_ratio,
            "torchvision_ratio": self.torchvision_ratio,
            "ort_u8s8_ms": self.ms(self.ort_u8s8_key) if self.ort_u8s8_key else None,
            "ort_u8s8_format": self.ort_u8s8_format,
            "ort_own_best_ms": self.ort_own_best_ms,
            "ort_own_ratio": own_ratio,
            "qz_as_fast_as_ort_own": None if own_ratio is None else own_ratio <= 1,
            "size_ratio": self.size_ratio,
            **{key: getattr(self, key) for key in _SIZES},
            "float_islands": self.float_islands,
            "rounds": max((lat.runs for lat in self.latency.values()), default=0),
            "seconds": self.seconds,
            "load_average": self.load_average,
            "other_cores": self.other_cores,
            "busy": self.busy,
            "error": self.error,
            "notes": "; ".join(f"{k}: {v}" for k, v in self.notes.items()),
            "hotspots": "; ".join(f"{k}: {v}" for k, v in self.hotspots.items()),
        }
        return record


def write_bench_csv(rows: list[BenchRow], path: str | os.PathLike) -> Path:
    """Writes one flat CSV record per row (``BenchRow.as_dict``); returns the path."""
    records = [r.as_dict() for r in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]) if records else ["model"])
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(path, text.getvalue())
    return Path(path)


def write_bench_json(rows: list[BenchRow], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Writes the rows (notes and hotspots as maps), the runners timed and ``meta``; returns the path."""
    runners = {k: v for k, v in RUNNERS.items() if any(k in r.latency for r in rows)}
    structured = [r.as_dict() | {"notes": r.notes, "hotspots": r.hotspots} for r in rows]
    payload = {"meta": meta, "runners": runners, "rows": structured}
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    return Path(path)


def _as_map(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    pairs = [item.partition(": ") for item in str(value or "").split("; ") if item]
    return {k: v for k, _, v in pairs}


def _row_from_record(rec: dict[str, Any]) -> BenchRow:
    row = BenchRow(
        rec["model"],
        task=rec.get("task", ""),
        family=rec.get("family", ""),
        backend=rec.get("backend", ""),
        batch_size=rec.get("batch_size", 1),
        input_size=(rec.get("input_h", 224), rec.get("input_w", 224)),
        error=rec.get("error"),
        notes=_as_map(rec.get("notes")),
        hotspots=_as_map(rec.get("hotspots")),
        ort_partial=bool(rec.get("ort_partial", False)),
        ov_int8_precision=rec.get("ov_int8_precision") or None,
        nncf_int8_precision=rec.get("nncf_int8_precision") or None,
        load_average=rec.get("load_average"),
        other_cores=rec.get("other_cores"),
        busy=rec.get("busy") in (True, "True"),
    )
    for key in _SIZES:
        setattr(row, key, rec.get(key))
    row.float_islands, row.seconds = rec.get("float_islands"), rec.get("seconds")
    if rec.get("target") is not None:
        row.target = float(rec["target"])
    for key in RUNNERS:
        if rec.get(f"{key}_ms") is not None:
            row.latency[key] = Latency(rec[f"{key}_ms"], rec[f"{key}_p10_ms"], rec[f"{key}_p90_ms"], rec["rounds"])
    return row


def read_bench_json(path: str | os.PathLike) -> tuple[list[BenchRow], dict[str, Any]]:
    """The rows and run metadata of a ``bench.json`` that ``write_bench_json`` wrote.

    Lets ``qz bench --from`` re-render tables, plots and README blocks, or merge runs, without timing again.

    Raises:
        QzError: the file is missing or is not a qz bench result.
    """
    path = Path(path)
    if not path.is_file():
        raise QzError(f"No bench result at {path}: run 'qz bench ... --out DIR' first (it writes DIR/bench.json).")
    try:
        payload = json.loads(path.read_text())
        return [_row_from_record(rec) for rec in payload["rows"]], payload.get("meta", {})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise QzError(f"{path} is not a qz bench result ({type(exc).__name__}: {exc}).") from None
