"""``qz bench`` and ``qz support``: the benchmark suite and the support matrix from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qz_core.backend import resolve_backend, supported_backends
from qz_core.errors import QzError
from qz_core.registry import TASKS
from qz_core.support import DEFAULT_ENGINES


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="model names or wildcards (see 'qz list')")
    p.add_argument("--task", choices=TASKS, help="every model of this task (or filter the names given)")
    p.add_argument("--all", action="store_true", dest="all_models", help="every registered model")


def _input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts if p)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"invalid input size {text!r}: use H or HxW, e.g. 224 or 320x320")
    return (size[0], size[-1])


def _update_readme(path: str | None, block: str, markdown: str) -> None:
    if path:
        from qz_core.report import update_readme_block

        changed = update_readme_block(path, block, markdown)
        print(f"{path}: block {block!r} {'updated' if changed else 'unchanged'}")


def _merge_results(paths: list[str], read: Callable[[str], tuple[list, dict]]) -> tuple[list, dict]:
    """Rows of several saved results (a later file's row replaces an earlier one of the same model).

    Order is kept: a replaced row stays where it first stood.
    """
    rows: dict[str, object] = {}
    metas = []
    for path in paths:
        found, meta = read(path)
        metas.append(meta | {"source": path})
        rows |= {getattr(r, "model", None) or r.name: r for r in found}
    meta = dict(metas[0]) if len(metas) == 1 else metas[0] | {"merged": metas}
    return list(rows.values()), meta


def _cmd_bench(args: argparse.Namespace) -> int:
    from qz_core.benchmark import machine_info, run_benchmark, select_models
    from qz_core.report import BENCH_BLOCK, bench_markdown, write_bench_outputs

    if args.from_json:
        if args.models or args.task or args.all_models:
            raise QzError("--from re-renders saved results: pass it without model names, --task or --all.")
        from qz_core.report import read_bench_json

        rows, meta = _merge_results(args.from_json, read_bench_json)
        paths = write_bench_outputs(rows, args.out, meta)
        print(bench_markdown(rows, meta))
        print("written: " + ", ".join(str(p) for p in paths.values()))
        _update_readme(args.readme, BENCH_BLOCK, bench_markdown(rows, meta, collapse=True))
        return 0
    names = select_models(args.models, task=args.task, all_models=args.all_models)
    backend = resolve_backend(args.backend)
    meta = machine_info(args.threads, backend) | {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "weights": args.weights or "random (BatchNorm statistics re-estimated)",
        "calib_batches": args.calib_batches,
        "ort_quantize": args.ort_quantize,
        "budget_s": args.budget,
    }
    rows = run_benchmark(
        names,
        batch_size=args.batch_size,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        weights=args.weights,
        backend=backend,
        ort=args.ort,
        ort_quantize=args.ort_quantize,
        compare_torchvision=args.torchvision,
        calib_batches=args.calib_batches,
        input_size=args.input_size,
        budget_s=args.budget,
        # Saved after every model: a sweep stopped half-way keeps what it measured.
        on_row=lambda done: write_bench_outputs(done, args.out, meta | {"partial": len(done)}, plots=False),
    )
    meta["load_average_end"] = machine_info(args.threads, backend)["load_average"]
    paths = write_bench_outputs(rows, args.out, meta)
    markdown = bench_markdown(rows, meta)
    print(markdown)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    _update_readme(args.readme, BENCH_BLOCK, bench_markdown(rows, meta, collapse=True))
    failed = [r.model for r in rows if r.error]
    if failed:
        print(f"{len(failed)} of {len(rows)} models failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and args.strict else 0


def _cmd_support(args: argparse.Namespace) -> int:
    from qz_core.benchmark import machine_info, run_support, select_models
    from qz_core.report import SUPPORT_BLOCK, support_markdown, write_support_outputs

    if args.from_json:
        from qz_core.report import read_support_json

        if args.models or args.task or args.all_models:
            raise QzError("--from re-renders saved results: pass it without model names, --task or --all.")
        results, meta = _merge_results(args.from_json, read_support_json)
        paths = write_support_outputs(results, args.out, meta)
        print(support_markdown(results))
        print("written: " + ", ".join(str(p) for p in paths.values()))
        _update_readme(args.readme, SUPPORT_BLOCK, support_markdown(results))
        return 0
    names = select_models(args.models, task=args.task, all_models=args.all_models or not args.models)
    engines = args.engines.split(",") if args.engines else list(DEFAULT_ENGINES)
    unknown = [e for e in engines if e not in supported_backends()]
    if unknown:
        raise QzError(f"Unknown engine(s) {', '.join(unknown)}; this PyTorch build has {supported_backends()}.")
    results = run_support(names, engines=engines, opset=args.opset, onnx=args.onnx)
    meta = machine_info(1, engines[0]) | {"engines": engines, "opset": args.opset}
    paths = write_support_outputs(results, args.out, meta)
    markdown = support_markdown(results)
    print(markdown)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    _update_readme(args.readme, SUPPORT_BLOCK, markdown)
    return 0


def _from_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="from_json",
        nargs="+",
        metavar="JSON",
        help="re-render the outputs and --readme from saved .json results (merged in order; a later row of a "
        "model replaces an earlier one) without running anything",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz bench`` and ``qz support`` to the ``qz`` command."""
    p = sub.add_parser(
        "bench",
        help="FP32 vs INT8 latency (eager and onnxruntime), sizes and memory; CSV, JSON, markdown, PNG",
        description="Quantizes each model (random or given weights) and times FP32/INT8 eager and "
        "onnxruntime interleaved in one process. Run it on a quiet machine.",
    )
    _selection(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of PyTorch and onnxruntime")
    p.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True, help="time ONNX in onnxruntime")
    p.add_argument(
        "--ort-quantize",
        action="store_true",
        help="also quantize the FP32 ONNX with onnxruntime's own quantize_static (S8S8 defaults; U8S8 per-channel, "
        "QDQ and QOperator) on the same calibration data and time it against qz's INT8 ONNX",
    )
    p.add_argument("--torchvision", action="store_true", help="also time torchvision's own INT8 model where it exists")
    p.add_argument("--weights", default=None, help="weights for every model (DEFAULT, path); random when omitted")
    p.add_argument("--backend", choices=supported_backends(), default=None, help="default: the platform's")
    p.add_argument("--calib-batches", type=int, default=4, help="random calibration batches of 2 images")
    p.add_argument("--input-size", type=_input_size, default=None, help="H or HxW instead of each model's own")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timing seconds per model: slower models get fewer rounds (at least 5); default: always --rounds",
    )
    p.add_argument("--readme", default=None, help="rewrite the bench-table block of this README")
    _from_option(p)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a model fails")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "support",
        help="support matrix: PTQ, QAT, INT8 per engine, FP32/INT8 ONNX, float islands (markdown + JSON)",
        description="Runs every step of qz on each model (random weights) and tabulates what worked.",
    )
    _selection(p)
    p.add_argument("--out", default="support-results", help="output folder")
    p.add_argument("--engines", default=None, help=f"comma-separated engines (default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="export and run ONNX")
    p.add_argument("--readme", default=None, help="rewrite the support-table block of this README")
    _from_option(p)
    p.set_defaults(func=_cmd_support)
