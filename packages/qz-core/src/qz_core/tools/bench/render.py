"""Benchmark results as people read them: markdown tables and PNG plots, and every output file at once."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qz_core.files import atomic_path, write_text_atomic
from qz_core.tools.bench.results import (
    NO_TORCHVISION_MODEL,
    WORTH_DEPLOYING,
    BenchRow,
    write_bench_csv,
    write_bench_json,
)
from qz_core.tools.markdown import ms, notes, num, table
from qz_core.tools.ort_tools import ORT_OWN


def _header(rows: Sequence[BenchRow], tv: bool, own: bool, ov: bool, anchor: bool) -> list[str]:
    header = ["Model", "before (ms)", "after (ms)", "ratio", "ORT FP32 (ms)", "ORT INT8 (ms)"]
    header += ["OpenVINO FP32 (ms)", "OpenVINO INT8 (ms)", "OpenVINO INT8 layers"] if ov else []
    header += ["NNCF INT8 (ms)", "qz / NNCF"] if anchor else []
    header += ["deployed ratio", "INT8 / fastest FP32"]
    header += ["target", "met"]
    header += ["torchvision INT8 (ms)"] if tv else []
    header += ["ORT own S8S8 (ms)", "ORT own U8S8 (ms)", "U8S8 format", "qz / ORT own", "qz as fast"] if own else []
    return header + ["FP32 (MB)", "INT8 (MB)", "peak RSS (MB)"]


def _nncf_cell(r: BenchRow) -> str:
    if "nncf_int8" in r.latency:
        return ms(r.ms("nncf_int8"))
    return "failed (see notes)" if "nncf_int8" in r.notes else "-"


def _cells(r: BenchRow, tv: bool, own: bool, ov: bool, anchor: bool) -> list[str]:
    after = ms(r.ms("int8")) if "int8" in r.latency else ("error" if r.error else "-")
    cells = [r.model, ms(r.ms("fp32")), after, num(r.eager_ratio)]
    cells += [ms(r.ms("ort_fp32")), ms(r.ms("ort_int8"))]
    cells += [ms(r.ms("ov_fp32")), ms(r.ms("ov_int8")), r.ov_int8_precision or "-"] if ov else []
    slower = r.nncf_ratio is not None and r.nncf_ratio > 1
    cells += [_nncf_cell(r), num(r.nncf_ratio) + (" **!**" if slower else "")] if anchor else []
    cells += [num(r.deployed_ratio), num(r.int8_vs_fastest_fp32) + ("" if r.worth_deploying is not False else " **!**")]
    cells += [num(r.target), {True: "Y", False: "**N**", None: "-"}[r.meets_target]]
    cells += [ms(r.ms("tv_int8"))] if tv else []
    if own:
        ratio = r.ort_own_ratio
        cells += [ms(r.ms("ort_s8s8")), ms(r.ms(r.ort_u8s8_key) if r.ort_u8s8_key else None)]
        cells += [r.ort_u8s8_format or "-", num(ratio), "-" if ratio is None else "Y" if ratio <= 1 else "N"]
    return cells + [num(r.fp32_mb, 1), num(r.int8_mb, 1), num(r.peak_rss_mb, 0)]


def _preamble(rows: Sequence[BenchRow], meta: dict[str, Any]) -> list[str]:
    lines = [
        f"Batch {rows[0].batch_size if rows else 1}, {meta.get('threads')} thread(s), backend "
        f"{meta.get('backend')}, median of {_rounds(meta)} interleaved rounds; {meta.get('cpu')}, "
        f"torch {meta.get('torch')}, onnxruntime {meta.get('onnxruntime')}{_openvino(meta)} ({meta.get('date')}).",
        "",
    ]
    if meta.get("partial"):
        lines += [f"Partial: the run is still going or was stopped; {meta['partial']} model(s) so far.", ""]
    busy = _busy_warning(meta)
    return lines + ([busy, ""] if busy else []) + [targets_line(rows), ""]


def targets_line(rows: Sequence[BenchRow]) -> str:
    """The targets the table is read against: ``WORTH_DEPLOYING``, and each family's deployed-ratio target."""
    by_target: dict[float, list[str]] = {}
    for family, target in sorted({(r.family, r.target) for r in rows if r.target is not None}):
        by_target.setdefault(target, []).append(family)
    deployed = "; ".join(f"{', '.join(names)} {num(target)}" for target, names in sorted(by_target.items()))
    return (
        f"Targets: INT8 / fastest FP32 at most {num(WORTH_DEPLOYING)} for every model (above it: **!**); "
        f"deployed ratio (set by each model's task package) at most {deployed or '-'}. A miss is **N**."
    )


def _openvino(meta: dict[str, Any]) -> str:
    return f", OpenVINO {meta['openvino']}" if meta.get("openvino") else ""


def bench_markdown(rows: Sequence[BenchRow], meta: dict[str, Any] | None = None, *, collapse: bool = False) -> str:
    """The benchmark table (Model | before | after | ratio) plus ORT, targets and sizes.

    "before" is FP32 eager and "after" INT8 eager PyTorch, both medians in milliseconds. When
    onnxruntime's own quantization was timed, its S8S8 and faster U8S8 files follow, with qz's ORT
    INT8 over the best of them and whether qz's file is at least as fast. When OpenVINO was timed, its
    FP32 and INT8 columns come before the deployed ratio (which takes the fastest INT8 of eager, onnxruntime
    and OpenVINO), with the precisions OpenVINO's INT8 compute layers ran in. "INT8 / fastest FP32" sets the
    fastest INT8 against the fastest FP32 runtime; above ``WORTH_DEPLOYING`` it is flagged and named among
    the misses, since FP32 in that runtime would serve as well. With more than one family
    a summary by family comes first; ``collapse`` folds the per-model table into a ``<details>``
    block (for a README).
    """
    tv = any("tv_int8" in r.latency for r in rows)
    own = any(k in r.latency for r in rows for k in ORT_OWN) or any(k in r.notes for r in rows for k in ORT_OWN)
    ov = any(k in r.latency or k in r.notes for r in rows for k in ("ov_fp32", "ov_int8"))
    anchor = any("nncf_int8" in r.latency or "nncf_int8" in r.notes for r in rows)
    lines = _preamble(rows, meta) if meta else []
    models = table(_header(rows, tv, own, ov, anchor), [_cells(r, tv, own, ov, anchor) for r in rows])
    if len({(r.task, r.family) for r in rows}) > 1:
        lines += ["By family (ratios: min / median / max):", "", bench_summary_markdown(rows), ""]
    if anchor:
        lines += [nncf_summary(rows), ""]
    if collapse:
        models = ["<details><summary>Every model</summary>", "", *models, "", "</details>"]
    lines += models
    lines += notes("Errors:", [(r.model, r.error) for r in rows if r.error])
    lines += notes("Misses (where the INT8 time goes, by operator):", [(r.model, _miss(r)) for r in rows if _miss(r)])
    # "torchvision has no such model" is what the "-" in its column already says.
    extra = [(r.model, f"{k}: {v}") for r in rows for k, v in r.notes.items() if v != NO_TORCHVISION_MODEL]
    lines += notes("Notes:", extra)
    lines += notes("Timed on a busy machine (other processes' cores while timing, 1-minute load before):", _busy(rows))
    return "\n".join(lines) + "\n"


def nncf_summary(rows: Sequence[BenchRow]) -> str:
    """One line: the geometric mean of qz / NNCF over the models both timed, and where qz is slower."""
    ratios = {r.model: r.nncf_ratio for r in rows if r.nncf_ratio is not None}
    if not ratios:
        return "qz / NNCF: no model has both timed."
    mean = math.exp(sum(math.log(v) for v in ratios.values()) / len(ratios))
    slower = [f"{m} ({num(v)})" for m, v in ratios.items() if v > 1]
    return (
        f"qz / NNCF (qz's fastest INT8 over NNCF's INT8 in OpenVINO): geometric mean {num(mean)} over "
        f"{len(ratios)} model(s); qz slower on: {', '.join(slower) or 'none'}."
    )


def _busy(rows: Sequence[BenchRow]) -> list[tuple[str, str]]:
    return [(r.model, f"{num(r.other_cores)} other cores, load {num(r.load_average)}") for r in rows if r.busy]


def _rounds(meta: dict[str, Any]) -> str:
    if meta.get("budget_s") is None:
        return str(meta.get("rounds"))
    return f"up to {meta.get('rounds')} (fewer, at least 5, past {meta['budget_s']:g} s a model; see bench.csv)"


def _busy_warning(meta: dict[str, Any]) -> str:
    """A warning line when the load average says other work shared the CPU with the run."""
    threads = meta.get("threads") or 1
    start = (meta.get("load_average") or [0.0])[0]
    end = (meta.get("load_average_end") or [None])[0]
    # Before the run nothing of qz's was running; at its end the bench itself accounts for ``threads``.
    if start <= 0.5 and (end is None or end <= threads + 0.5):
        return ""
    when = f"{start:.1f} before" + ("" if end is None else f" and {end:.1f} after")
    return (
        f"**Busy machine**: 1-minute load average {when} the run ({threads} thread(s) are the bench's own), "
        "so other work competed for the cores: ratios are indicative only. Publish numbers from a quiet machine."
    )


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    low, mid, high = values[0], values[len(values) // 2], values[-1]
    return num(low) if len(values) == 1 else f"{num(low)} / {num(mid)} / {num(high)}"


def bench_summary_markdown(rows: Sequence[BenchRow]) -> str:
    """One line per family: how many models meet the deployed-ratio target, and the ratios' spread.

    Ratios are min / median / max over the family's measured models; "met" counts models whose
    deployed ratio is at most the target, and the misses are named.
    """
    families: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        families.setdefault((r.task, r.family or "-"), []).append(r)
    header = ["Task", "Family", "models", "eager ratio", "deployed ratio", "target", "met", "size ratio", "misses"]
    body = []
    for (task, family), members in families.items():
        misses = [r.model for r in members if r.meets_target is False or r.error or r.slower_than_torchvision]
        body.append(
            [
                task or "-",
                family,
                str(len(members)),
                _spread([r.eager_ratio for r in members if r.eager_ratio is not None]),
                _spread([r.deployed_ratio for r in members if r.deployed_ratio is not None]),
                ", ".join(num(t) for t in sorted({r.target for r in members})),
                f"{sum(bool(r.meets_target) for r in members)}/{len(members)}",
                _spread([r.size_ratio for r in members if r.size_ratio is not None]),
                ", ".join(misses) or "-",
            ]
        )
    return "\n".join(table(header, body)) + "\n"


def _miss(row: BenchRow) -> str:
    """Why a row misses its targets, with the profile of its INT8 engines; empty when it does not."""
    reasons = []
    if row.meets_target is False:
        profile = "; ".join(f"{engine}: {text}" for engine, text in row.hotspots.items())
        reasons.append(f"deployed ratio {num(row.deployed_ratio)} > target {num(row.target)}. {profile}".strip())
    if row.worth_deploying is False:
        reasons.append(
            f"its fastest INT8 takes {num(row.int8_vs_fastest_fp32)} of the fastest FP32 runtime's time "
            f"(more than {num(WORTH_DEPLOYING)}): FP32 in that runtime serves about as well."
        )
    if row.slower_than_torchvision:
        reasons.append(f"INT8 eager {ms(row.ms('int8'))} ms is slower than torchvision's {ms(row.ms('tv_int8'))} ms")
    return " ".join(reasons)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    plt = _pyplot()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


# The ratio plot's size: a fixed width, and a height that grows with the models up to a bound.
PLOT_WIDTH_IN = 10.0
PLOT_MAX_HEIGHT_IN = 40.0
PLOT_DPI = 100
RATIO_AXIS_MAX = 1.5  # ratios past it are clipped, their value printed at the edge


def _by_task(rows: Sequence[BenchRow]) -> dict[str, list[BenchRow]]:
    measured = sorted((r for r in rows if r.deployed_ratio is not None), key=lambda r: (r.task, r.family, r.model))
    tasks: dict[str, list[BenchRow]] = {}
    for r in measured:
        tasks.setdefault(r.task or "-", []).append(r)
    return tasks


def _bar(ax: Any, y: float, ratio: float | None, color: str) -> None:
    if ratio is None:
        return
    ax.barh(y, min(ratio, RATIO_AXIS_MAX), 0.4, color=color)
    if ratio > RATIO_AXIS_MAX:
        ax.annotate(f"{ratio:.1f}", (RATIO_AXIS_MAX, y), ha="right", va="center", fontsize=6, color="white")


def _ratio_panel(ax: Any, task: str, members: list[BenchRow]) -> None:
    """One task's models as horizontal bar pairs, grouped by family, with their targets."""
    ticks, labels, y = [], [], 0.0
    families: dict[str, list[BenchRow]] = {}
    for r in members:
        families.setdefault(r.family or "-", []).append(r)
    for family, group in families.items():
        first = y
        for r in group:
            _bar(ax, y - 0.2, r.deployed_ratio, "tab:blue")
            _bar(ax, y + 0.2, r.int8_vs_fastest_fp32, "tab:orange")
            ax.vlines(r.target, y - 0.45, y + 0.05, colors="red", linewidth=2)
            missed = r.meets_target is False or r.worth_deploying is False
            ticks.append(y)
            labels.append(r.model + (" (miss)" if missed else ""))
            y += 1
        middle = (first + y - 1) / 2
        ax.text(1.01, middle, family, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=8)
        ax.axhline(y - 0.25, color="grey", linewidth=0.5)
        y += 0.5
    ax.axvline(WORTH_DEPLOYING, color="tab:orange", linestyle="--", linewidth=1)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_ylim(y - 0.5, -0.75)
    ax.set_xlim(0, RATIO_AXIS_MAX)
    ax.set_title(task, fontsize=10, loc="left")


def ratio_figure(rows: Sequence[BenchRow]) -> Any:
    """The INT8/FP32 ratio figure: one panel per task, one bar pair per model grouped by family.

    Blue: fastest INT8 / FP32 eager (the deployed ratio), with the model's target as a red tick;
    orange: fastest INT8 / fastest FP32 runtime, with ``WORTH_DEPLOYING`` dashed. Width is fixed,
    height grows with the models up to ``PLOT_MAX_HEIGHT_IN``.
    """
    plt = _pyplot()
    tasks = _by_task(rows) or {"no measured model": []}
    models = sum(len(m) for m in tasks.values())
    height = min(PLOT_MAX_HEIGHT_IN, 1.0 + 0.9 * len(tasks) + 0.3 * models)
    ratios = [max(len(m), 1) + 1.5 for m in tasks.values()]
    fig, axes = plt.subplots(
        len(tasks),
        1,
        figsize=(PLOT_WIDTH_IN, height),
        squeeze=False,
        gridspec_kw={"height_ratios": ratios},
        layout="constrained",
    )
    for ax, (task, members) in zip(axes[:, 0], tasks.items(), strict=True):
        _ratio_panel(ax, task, members)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange")]
    handles += [plt.Line2D([], [], color="red", linewidth=2), plt.Line2D([], [], color="tab:orange", linestyle="--")]
    labels = ["fastest INT8 / FP32 eager", "fastest INT8 / fastest FP32", "family target", "worth-deploying bound"]
    axes[-1, 0].set_xlabel("INT8 / FP32 latency (below 1: INT8 is faster)")
    fig.legend(handles, labels, fontsize=7, ncol=4, loc="outside lower center")
    return fig


def plot_ratios(rows: Sequence[BenchRow], path: str | os.PathLike) -> Path:
    """Writes ``ratio_figure`` of the rows as a PNG (atomically); returns the path."""
    _save_figure(ratio_figure(rows), Path(path), dpi=PLOT_DPI)
    return Path(path)


def _log_if_wide(values: list[float], set_scale: Any) -> None:
    if values and max(values) / min(values) > 20:
        set_scale("log")


def plot_latency_size(rows: Sequence[BenchRow], path: str | os.PathLike) -> Path:
    """Latency against state-dict size, FP32 and INT8 of each model joined by a line (ORT INT8 as crosses)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        points = [(r.fp32_mb, r.ms("fp32"), "o", "tab:blue"), (r.int8_mb, r.ms("int8"), "^", "tab:red")]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if len(points) == 2:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="grey", linewidth=0.7)
        for mb, ms_, marker, color in points:
            ax.scatter(mb, ms_, marker=marker, color=color, zorder=3)
        if points:
            ax.annotate(r.model, points[0][:2], fontsize=7, xytext=(3, 3), textcoords="offset points")
        if r.int8_mb is not None and r.ms("ort_int8") is not None:
            ax.scatter(r.int8_mb, r.ms("ort_int8"), marker="x", color="tab:green", zorder=3)
    for marker, color, label in (("o", "tab:blue", "FP32 eager"), ("^", "tab:red", "INT8 eager")):
        ax.scatter([], [], marker=marker, color=color, label=label)
    ax.scatter([], [], marker="x", color="tab:green", label="ORT INT8")
    _log_if_wide([v for r in rows for v in (r.fp32_mb, r.int8_mb) if v], ax.set_xscale)
    _log_if_wide([v for r in rows for v in (r.ms("fp32"), r.ms("int8")) if v], ax.set_yscale)
    ax.set_xlabel("state dict size (MiB)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title("Latency vs size (grey line: same model FP32 -> INT8)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, Path(path))
    return Path(path)


def write_bench_outputs(
    rows: Sequence[BenchRow], out_dir: str | os.PathLike, meta: dict[str, Any], *, plots: bool = True
) -> dict[str, Path]:
    """Writes bench.csv, bench.json, bench.md and (with matplotlib and ``plots``) two PNG plots; returns the paths."""
    out = Path(out_dir)
    rows = list(rows)
    paths = {
        "csv": write_bench_csv(rows, out / "bench.csv"),
        "json": write_bench_json(rows, out / "bench.json", meta),
        "markdown": out / "bench.md",
    }
    write_text_atomic(paths["markdown"], bench_markdown(rows, meta))
    if not plots:
        return paths
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn("matplotlib is not installed: no benchmark plots (pip install matplotlib).", stacklevel=2)
        return paths
    paths["ratio_png"] = plot_ratios(rows, out / "bench_ratio.png")
    paths["size_png"] = plot_latency_size(rows, out / "bench_latency_size.png")
    return paths
