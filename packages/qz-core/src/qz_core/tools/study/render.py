"""The study's outputs: per sweep a markdown table, a CSV and a plot; the sensitivity table and plot.

Every file is written atomically. Plots need matplotlib (``pip install 'qz-core[bench]'``); without it
the tables are written and the plots are skipped with a note.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

from qz_core.files import atomic_path, write_text_atomic
from qz_core.mixed_precision import LayerSensitivity
from qz_core.tools.markdown import ms, num, table
from qz_core.tools.study.axes import RowConfig, row_label
from qz_core.tools.study.runner import Row, StudyResult

MAX_PLOT_ROWS = 40
FP32 = "FP32"


def score_columns(metric_key: str, rows: Sequence[Row]) -> list[str]:
    """The score names to show: the headline metric first, the loss last."""
    names = {k for r in rows for k in r.scores}
    others = sorted(names - {metric_key, "loss"})
    return [metric_key, *others] + (["loss"] if "loss" in names else [])


def config_text(config: RowConfig) -> str:
    """A configuration in one short line."""
    rr = "default" if config.reduce_range is None else config.reduce_range
    return (
        f"fuse={config.fuse_level} act={config.activation_observer or 'default'} "
        f"w={config.weight_observer or 'default'} reduce_range={rr} "
        f"start={config.quantize_from or 'all'} calib={config.calib_fraction:.0%} relu6={config.relu6}"
    )


def _latency_cell(row: Row) -> str:
    if row.latency_ms is None:
        return "-"
    return ms(row.latency_ms) + ("*" if row.latency_pass == "sequential" else "")


def sweep_markdown(result: StudyResult, sweep: str, meta: dict[str, Any]) -> str:
    """One sweep's table with the FP32 row first, and what it was measured on."""
    pairs = result.sweep_rows(sweep)
    columns = score_columns(result.metric_key, [result.baseline] + [r for _, r in pairs])
    header = [sweep, *columns, "size (MB)", "latency (ms)", "calib batches", "configuration"]
    base = result.baseline
    lines = [
        [
            FP32,
            *(num(base.scores.get(c), 4 if c == "loss" else 2) for c in columns),
            num(base.size_mb),
            ms(base.latency_ms),
            "-",
            "float",
        ]
    ]
    for config, row in pairs:
        if row.error:
            lines.append([row_label(sweep, config), *("-" for _ in columns), "-", "-", "-", f"failed: {row.error}"])
            continue
        scores = [num(row.scores.get(c), 4 if c == "loss" else 2) for c in columns]
        lines.append(
            [
                row_label(sweep, config),
                *scores,
                num(row.size_mb),
                _latency_cell(row),
                str(row.calib_batches),
                config_text(config),
            ]
        )
    text = [f"## {sweep}", "", _measured_on(meta), ""] + table(header, lines)
    if any(row.latency_pass == "sequential" for _, row in pairs):
        text += [
            "",
            "\\* timed in a sequential pass after the rows ran in parallel (rebuilt, calibrated on one batch).",
        ]
    return "\n".join(text) + "\n"


def _measured_on(meta: dict[str, Any]) -> str:
    load = meta.get("load_average")
    busy = ""
    if load and meta.get("cpu_count") and load[0] > 0.5 * meta["cpu_count"]:
        busy = " **Busy machine: latencies are indicative only.**"
    load_text = f", load average {load[0]:.1f} on {meta.get('cpu_count')} cores" if load else ""
    return (
        f"{meta.get('model')} ({meta.get('weights')}), {meta.get('task')} on {meta.get('val')}; backend "
        f"{meta.get('backend')}; latency batch 1, 1 thread, median of {meta.get('rounds')}{load_text}.{busy}"
    )


def sweep_csv(result: StudyResult, sweep: str) -> str:
    """One sweep as CSV: each row's full configuration (enough to rerun it), scores, size, latency."""
    pairs = result.sweep_rows(sweep)
    columns = score_columns(result.metric_key, [result.baseline] + [r for _, r in pairs])
    config_fields = [f.name for f in fields(RowConfig)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "sweep",
            "label",
            "key",
            *config_fields,
            *columns,
            "size_mb",
            "latency_ms",
            "latency_pass",
            "calib_batches",
            "error",
        ]
    )
    entries = [(FP32, None, result.baseline)] + [(row_label(sweep, c), c, r) for c, r in pairs]
    for label, config, row in entries:
        values = [""] * len(config_fields) if config is None else [_csv_value(v) for v in config.to_dict().values()]
        scores = [_csv_value(row.scores.get(c)) for c in columns]
        writer.writerow(
            [
                sweep,
                label,
                row.key,
                *values,
                *scores,
                _csv_value(row.size_mb),
                _csv_value(row.latency_ms),
                row.latency_pass or "",
                row.calib_batches,
                row.error or "",
            ]
        )
    return buffer.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class Panel(NamedTuple):
    """One panel of a plot: a value per row, the FP32 value, and bars from zero or dots on a zoomed axis."""

    name: str
    values: list[float]
    reference: float | None = None
    bars: bool = True


def _plot(path: Path, title: str, labels: list[str], panels: list[Panel]) -> bool:
    """Panels side by side, one row per label, the FP32 value as a dashed line; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [label if len(label) <= 60 else label[:57] + "..." for label in labels][:MAX_PLOT_ROWS]
    height = min(12.0, 1.5 + 0.32 * len(labels))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 3.5, height), sharey=True, squeeze=False)
    positions = list(range(len(labels)))
    for ax, panel in zip(axes[0], panels, strict=True):
        values = panel.values[: len(labels)]
        if panel.bars:
            ax.barh(positions, values, color="#4C72B0")
        else:
            ax.plot(values, positions, "o", color="#4C72B0")
            ax.margins(x=0.25)
        if panel.reference is not None:
            ax.axvline(panel.reference, color="#C44E52", linestyle="--", label=f"FP32 {panel.reference:.4g}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(panel.name)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def _value(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")


def plot_sweep(result: StudyResult, sweep: str, path: Path) -> bool:
    """The metric, loss (when the task has one) and latency of each row against FP32; False without matplotlib."""
    pairs = [(c, r) for c, r in result.sweep_rows(sweep) if r.error is None]
    base, key = result.baseline, result.metric_key
    panels = [Panel(key, [_value(r.scores.get(key)) for _, r in pairs], base.scores.get(key), bars=False)]
    if "loss" in base.scores:
        panels.append(Panel("loss", [_value(r.scores.get("loss")) for _, r in pairs], base.scores["loss"], bars=False))
    latencies = [_value(r.latency_ms) for _, r in pairs]
    panels.append(Panel("latency (ms, batch 1, 1 thread)", latencies, base.latency_ms))
    return _plot(path, f"{sweep} sweep", [row_label(sweep, c) for c, _ in pairs], panels)


def write_study_outputs(result: StudyResult, out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Per sweep SWEEP.md, SWEEP.csv and SWEEP.png, plus study.json (every row with its configuration)."""
    written: dict[str, Path] = {}
    for sweep in result.plan.sweeps:
        write_text_atomic(out / f"{sweep}.md", sweep_markdown(result, sweep, meta))
        write_text_atomic(out / f"{sweep}.csv", sweep_csv(result, sweep))
        written[f"{sweep}.md"], written[f"{sweep}.csv"] = out / f"{sweep}.md", out / f"{sweep}.csv"
        if plot_sweep(result, sweep, out / f"{sweep}.png"):
            written[f"{sweep}.png"] = out / f"{sweep}.png"
    payload = {
        "meta": meta,
        "metric": result.metric_key,
        "baseline": asdict(result.baseline),
        "sweeps": {s: [asdict(r) for _, r in result.sweep_rows(s)] for s in result.plan.sweeps},
    }
    write_text_atomic(out / "study.json", json.dumps(payload, indent=1))
    written["study.json"] = out / "study.json"
    return written


def sensitivity_markdown(
    results: Sequence[LayerSensitivity], metric_key: str, fp32: float, meta: dict[str, Any]
) -> str:
    """The layers, most sensitive first."""
    header = ["rank", "layer", metric_key, "drop", "output SQNR (dB)", "FP32 ms", "INT8 ms", "INT8 slower"]
    rows = [
        [
            str(i),
            r.name,
            num(r.metric),
            num(r.drop),
            num(r.sqnr_db, 1),
            ms(r.fp32_ms),
            ms(r.int8_ms),
            "yes" if r.slower_in_int8 else "",
        ]
        for i, r in enumerate(results, 1)
    ]
    intro = (
        f"Each layer quantized alone (the rest float): {metric_key} against FP32 {fp32:.2f}, output SQNR on the first "
        "validation batches, and the layer alone timed in FP32 and INT8 (batch 1, 1 thread)."
    )
    return "\n".join(["## Layer sensitivity", "", _measured_on(meta), "", intro, "", *table(header, rows)]) + "\n"


def sensitivity_csv(results: Sequence[LayerSensitivity]) -> str:
    """The sensitivity table as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "layer", "metric", "drop", "sqnr_db", "fp32_ms", "int8_ms", "slower_in_int8"])
    for i, r in enumerate(results, 1):
        writer.writerow(
            [i, r.name, *(_csv_value(v) for v in (r.metric, r.drop, r.sqnr_db, r.fp32_ms, r.int8_ms)), r.slower_in_int8]
        )
    return buffer.getvalue()


def write_sensitivity_outputs(
    results: Sequence[LayerSensitivity], metric_key: str, fp32: float, out: Path, meta: dict[str, Any]
) -> dict[str, Path]:
    """sensitivity.md, sensitivity.csv and sensitivity.png (drop and SQNR per layer, most sensitive first)."""
    write_text_atomic(out / "sensitivity.md", sensitivity_markdown(results, metric_key, fp32, meta))
    write_text_atomic(out / "sensitivity.csv", sensitivity_csv(results))
    written = {"sensitivity.md": out / "sensitivity.md", "sensitivity.csv": out / "sensitivity.csv"}
    panels = [
        Panel(f"{metric_key} drop vs FP32", [r.drop for r in results]),
        Panel("output SQNR (dB)", [_value(r.sqnr_db) for r in results]),
    ]
    if _plot(out / "sensitivity.png", "layer sensitivity (most sensitive first)", [r.name for r in results], panels):
        written["sensitivity.png"] = out / "sensitivity.png"
    return written
