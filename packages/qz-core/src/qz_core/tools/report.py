"""Benchmark and support results as CSV, JSON, markdown tables and PNG plots; README blocks rewritten.

README tables live between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers and are only
ever written by ``update_readme_block`` from generated markdown, never by hand.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qz_core.bench import Latency
from qz_core.benchmark import NO_TORCHVISION_MODEL, RUNNERS, BenchRow
from qz_core.errors import QzError
from qz_core.ort_tools import ORT_OWN
from qz_core.support import DEFAULT_ENGINES, SupportResult

BENCH_BLOCK = "bench-table"
SUPPORT_BLOCK = "support-table"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _notes(title: str, items: Sequence[tuple[str, str]]) -> list[str]:
    if not items:
        return []
    return ["", title, ""] + [f"- **{name}**: {text.replace(chr(10), ' ')}" for name, text in items]


def bench_markdown(rows: Sequence[BenchRow], meta: dict[str, Any] | None = None, *, collapse: bool = False) -> str:
    """The benchmark table in seed 001's format (Model | before | after | ratio) plus ORT and sizes.

    "before" is FP32 eager and "after" INT8 eager PyTorch, both medians in milliseconds. When
    onnxruntime's own quantization was timed, its S8S8 and faster U8S8 files follow, with qz's ORT
    INT8 over the best of them and whether qz's file is at least as fast. With more than one family
    a summary by family comes first; ``collapse`` folds the per-model table into a ``<details>``
    block (for a README).
    """
    tv = any("tv_int8" in r.latency for r in rows)
    own = any(k in r.latency for r in rows for k in ORT_OWN) or any(k in r.notes for r in rows for k in ORT_OWN)
    header = ["Model", "before (ms)", "after (ms)", "ratio", "ORT FP32 (ms)", "ORT INT8 (ms)", "deployed ratio"]
    header += ["target", "met"]
    header += ["torchvision INT8 (ms)"] if tv else []
    header += ["ORT own S8S8 (ms)", "ORT own U8S8 (ms)", "U8S8 format", "qz / ORT own", "qz as fast"] if own else []
    header += ["FP32 (MB)", "INT8 (MB)", "peak RSS (MB)"]
    body = []
    for r in rows:
        after = _ms(r.ms("int8")) if "int8" in r.latency else ("error" if r.error else "-")
        cells = [r.model, _ms(r.ms("fp32")), after, _num(r.eager_ratio)]
        cells += [_ms(r.ms("ort_fp32")), _ms(r.ms("ort_int8")), _num(r.deployed_ratio)]
        cells += [_num(r.target), {True: "Y", False: "**N**", None: "-"}[r.meets_target]]
        cells += [_ms(r.ms("tv_int8"))] if tv else []
        if own:
            ratio = r.ort_own_ratio
            cells += [_ms(r.ms("ort_s8s8")), _ms(r.ms(r.ort_u8s8_key) if r.ort_u8s8_key else None)]
            cells += [r.ort_u8s8_format or "-", _num(ratio), "-" if ratio is None else "Y" if ratio <= 1 else "N"]
        cells += [_num(r.fp32_mb, 1), _num(r.int8_mb, 1), _num(r.peak_rss_mb, 0)]
        body.append(cells)
    lines = []
    if meta:
        lines += [
            f"Batch {rows[0].batch_size if rows else 1}, {meta.get('threads')} thread(s), backend "
            f"{meta.get('backend')}, median of {_rounds(meta)} interleaved rounds; {meta.get('cpu')}, "
            f"torch {meta.get('torch')}, onnxruntime {meta.get('onnxruntime')} ({meta.get('date')}).",
            "",
        ]
        if meta.get("partial"):
            lines += [f"Partial: the run is still going or was stopped; {meta['partial']} model(s) so far.", ""]
        busy = _busy_warning(meta)
        lines += [busy, ""] if busy else []
    table = _table(header, body)
    if len({(r.task, r.family) for r in rows}) > 1:
        lines += ["By family (ratios: min / median / max):", "", bench_summary_markdown(rows), ""]
    if collapse:
        table = ["<details><summary>Every model</summary>", "", *table, "", "</details>"]
    lines += table
    lines += _notes("Errors:", [(r.model, r.error) for r in rows if r.error])
    lines += _notes("Misses (where the INT8 time goes, by operator):", [(r.model, _miss(r)) for r in rows if _miss(r)])
    # "torchvision has no such model" is what the "-" in its column already says.
    notes = [(r.model, f"{k}: {v}") for r in rows for k, v in r.notes.items() if v != NO_TORCHVISION_MODEL]
    lines += _notes("Notes:", notes)
    return "\n".join(lines) + "\n"


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

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        values = sorted(values)
        low, mid, high = values[0], values[len(values) // 2], values[-1]
        return _num(low) if len(values) == 1 else f"{_num(low)} / {_num(mid)} / {_num(high)}"

    for (task, family), members in families.items():
        measured = [r for r in members if r.deployed_ratio is not None]
        targets = sorted({r.target for r in members})
        misses = [r.model for r in members if r.meets_target is False or r.error or r.slower_than_torchvision]
        body.append(
            [
                task or "-",
                family,
                str(len(members)),
                spread([r.eager_ratio for r in members if r.eager_ratio is not None]),
                spread([r.deployed_ratio for r in measured]),
                ", ".join(_num(t) for t in targets),
                f"{sum(bool(r.meets_target) for r in members)}/{len(members)}",
                spread([r.size_ratio for r in members if r.size_ratio is not None]),
                ", ".join(misses) or "-",
            ]
        )
    return "\n".join(_table(header, body)) + "\n"


def _miss(row: BenchRow) -> str:
    """Why a row misses its targets, with the profile of its INT8 engines; empty when it does not."""
    reasons = []
    if row.meets_target is False:
        profile = "; ".join(f"{engine}: {text}" for engine, text in row.hotspots.items())
        reasons.append(f"deployed ratio {_num(row.deployed_ratio)} > target {_num(row.target)}. {profile}".strip())
    if row.slower_than_torchvision:
        reasons.append(f"INT8 eager {_ms(row.ms('int8'))} ms is slower than torchvision's {_ms(row.ms('tv_int8'))} ms")
    return " ".join(reasons)


def _plot_ratios(rows: Sequence[BenchRow], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.eager_ratio is not None), key=lambda r: (r.task, r.family, r.model))
    families = list(dict.fromkeys(r.family or "other" for r in rows))
    palette = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    colors = {f: palette(i % palette.N) for i, f in enumerate(families)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    for i, r in zip(xs, rows, strict=True):
        color = colors[r.family or "other"]
        ax.bar(i - 0.2, r.eager_ratio, 0.4, color=color)
        if r.deployed_ratio is not None:
            ax.bar(i + 0.2, r.deployed_ratio, 0.4, color=color, alpha=0.45, hatch="//", edgecolor="black")
        ax.hlines(r.target, i - 0.45, i + 0.45, colors="red", linewidth=1.5)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    top = 2.0  # a few eager ratios far above 1 would flatten every other bar: clip them and print their value
    ax.set_ylim(0, top)
    for i, r in zip(xs, rows, strict=True):
        for dx, ratio in ((-0.2, r.eager_ratio), (0.2, r.deployed_ratio)):
            if ratio is not None and ratio > top:
                ax.annotate(f"{ratio:.1f}", (i + dx, top), ha="center", va="top", fontsize=7, rotation=90)
    ax.set_xticks(list(xs), [r.model for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("INT8 / FP32 latency")
    ax.set_title(
        "INT8 / FP32 latency\nsolid: eager PyTorch; hatched: deployed = min(eager, ORT INT8); red: target", fontsize=10
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in families]
    ax.legend(handles, families, title="family", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_latency_size(rows: Sequence[BenchRow], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        points = [(r.fp32_mb, r.ms("fp32"), "o", "tab:blue"), (r.int8_mb, r.ms("int8"), "^", "tab:red")]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if len(points) == 2:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="grey", linewidth=0.7)
        for mb, ms, marker, color in points:
            ax.scatter(mb, ms, marker=marker, color=color, zorder=3)
        if points:
            ax.annotate(r.model, points[0][:2], fontsize=7, xytext=(3, 3), textcoords="offset points")
        if r.int8_mb is not None and r.ms("ort_int8") is not None:
            ax.scatter(r.int8_mb, r.ms("ort_int8"), marker="x", color="tab:green", zorder=3)
    for marker, color, label in (("o", "tab:blue", "FP32 eager"), ("^", "tab:red", "INT8 eager")):
        ax.scatter([], [], marker=marker, color=color, label=label)
    ax.scatter([], [], marker="x", color="tab:green", label="ORT INT8")
    sizes = [v for r in rows for v in (r.fp32_mb, r.int8_mb) if v]
    times = [v for r in rows for v in (r.ms("fp32"), r.ms("int8")) if v]
    if sizes and max(sizes) / min(sizes) > 20:
        ax.set_xscale("log")
    if times and max(times) / min(times) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("state dict size (MiB)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title("Latency vs size (grey line: same model FP32 -> INT8)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_bench_outputs(
    rows: Sequence[BenchRow], out_dir: str | os.PathLike, meta: dict[str, Any], *, plots: bool = True
) -> dict[str, Path]:
    """Writes bench.csv, bench.json, bench.md and (with matplotlib and ``plots``) two PNG plots; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [r.as_dict() for r in rows]
    paths = {"csv": out / "bench.csv", "json": out / "bench.json", "markdown": out / "bench.md"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["model"])
        writer.writeheader()
        writer.writerows(records)
    runners = {k: v for k, v in RUNNERS.items() if any(k in r.latency for r in rows)}
    structured = [rec | {"notes": r.notes, "hotspots": r.hotspots} for rec, r in zip(records, rows, strict=True)]
    payload = {"meta": meta, "runners": runners, "rows": structured}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["markdown"].write_text(bench_markdown(rows, meta))
    if not plots:
        return paths
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        warnings.warn("matplotlib is not installed: no benchmark plots (pip install matplotlib).", stacklevel=2)
        return paths
    paths["ratio_png"] = out / "bench_ratio.png"
    paths["size_png"] = out / "bench_latency_size.png"
    _plot_ratios(rows, paths["ratio_png"])
    _plot_latency_size(rows, paths["size_png"])
    return paths


def _as_map(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    pairs = [item.partition(": ") for item in str(value or "").split("; ") if item]
    return {k: v for k, _, v in pairs}


def read_bench_json(path: str | os.PathLike) -> tuple[list[BenchRow], dict[str, Any]]:
    """The rows and run metadata of a ``bench.json`` that ``write_bench_outputs`` wrote.

    Lets ``qz bench --from`` re-render tables, plots and README blocks, or merge runs, without timing again.

    Raises:
        QzError: the file is missing or is not a qz bench result.
    """
    path = Path(path)
    if not path.is_file():
        raise QzError(f"No bench result at {path}: run 'qz bench ... --out DIR' first (it writes DIR/bench.json).")
    try:
        payload = json.loads(path.read_text())
        records, meta = payload["rows"], payload.get("meta", {})
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QzError(f"{path} is not a qz bench result ({type(exc).__name__}: {exc}).") from None
    rows = []
    for rec in records:
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
        )
        for key in ("fp32_mb", "int8_mb", "fp32_onnx_mb", "int8_onnx_mb", "peak_rss_mb", "start_rss_mb"):
            setattr(row, key, rec.get(key))
        row.float_islands, row.seconds = rec.get("float_islands"), rec.get("seconds")
        if rec.get("target") is not None:
            row.target = float(rec["target"])
        for key in RUNNERS:
            if rec.get(f"{key}_ms") is not None:
                row.latency[key] = Latency(rec[f"{key}_ms"], rec[f"{key}_p10_ms"], rec[f"{key}_p90_ms"], rec["rounds"])
        rows.append(row)
    return rows, meta


def _yn(value: bool | None) -> str:
    return "-" if value is None else "Y" if value else "N"


def support_markdown(results: Sequence[SupportResult]) -> str:
    """The seed's section 3 support table, from what ``probe_model`` actually ran, with error notes."""
    engines = [e for e in DEFAULT_ENGINES if any(e in r.engines for r in results)]
    engines += sorted({e for r in results for e in r.engines} - set(engines))
    header = ["Model", "Quantization Support (PTQ, QAT)", *engines, "FP32 ONNX", "INT8 ONNX", "ONNX opset"]
    header += ["float islands"]
    body = []
    for r in results:
        quant = ", ".join(k for k, ok in (("PTQ", r.ptq), ("QAT", r.qat)) if ok) or "N"
        cells = [r.name, quant, *(_yn(r.engines.get(e)) for e in engines), _yn(r.fp32_onnx), _yn(r.int8_onnx)]
        cells += [str(r.opset) if r.fp32_onnx or r.int8_onnx else "N/A"]
        cells += ["-" if r.float_islands is None else str(r.float_islands)]
        body.append(cells)
    lines = _table(header, body)
    lines += _notes("Errors:", [(r.name, f"{k}: {v}") for r in results for k, v in r.errors.items()])
    return "\n".join(lines) + "\n"


def write_support_outputs(
    results: Sequence[SupportResult], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Writes support.json and support.md; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "support.json", "markdown": out / "support.md"}
    payload = {"meta": meta or {}, "rows": [r.as_dict() for r in results]}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["markdown"].write_text(support_markdown(results))
    return paths


def read_support_json(path: str | os.PathLike) -> tuple[list[SupportResult], dict[str, Any]]:
    """The rows and metadata of a ``support.json`` that ``write_support_outputs`` wrote.

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
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QzError(f"{path} is not a qz support result ({type(exc).__name__}: {exc}).") from None


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, content: str, *, source: str = "the text") -> str:
    """Returns ``text`` with the block between the ``name`` start and end markers set to ``content``.

    Raises:
        QzError: a marker is missing, repeated, or the end comes before the start.
    """
    start, end = _markers(name)
    for marker in (start, end):
        count = text.count(marker)
        if count != 1:
            problem = "is missing from" if count == 0 else f"appears {count} times in"
            raise QzError(f"Marker {marker!r} {problem} {source}; add exactly one {start} ... {end} pair.")
    i, j = text.index(start), text.index(end)
    if j < i:
        raise QzError(f"Marker {end!r} comes before {start!r} in {source}.")
    return text[: i + len(start)] + "\n" + content.strip("\n") + "\n" + text[j:]


def update_readme_block(path: str | os.PathLike, name: str, content: str) -> bool:
    """Rewrites the ``name`` block of a README file from generated markdown; True if it changed.

    Raises:
        QzError: the file does not exist, or its markers are missing or broken.
    """
    path = Path(path)
    if not path.is_file():
        raise QzError(f"README file {os.fspath(path)!r} does not exist.")
    text = path.read_text()
    new = replace_block(text, name, content, source=os.fspath(path))
    if new != text:
        path.write_text(new)
    return new != text
