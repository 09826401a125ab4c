"""``qz bench`` and ``qz support``: the benchmark suite and the support matrix from the command line.

Parsing and checks only; the work is ``qz_core.tools.bench`` and ``qz_core.tools.support``, imported
when a command runs so that ``qz --help`` stays light.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qz_core.backend import resolve_backend, supported_backends
from qz_core.errors import QzError, invalid_choice
from qz_core.files import check_output_dir
from qz_core.registry import list_tasks
from qz_core.tools.readme import BENCH_BLOCK, SUPPORT_BLOCK, check_readme, update_readme_block
from qz_core.tools.support.probe import DEFAULT_ENGINES


def _input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts if p)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"invalid input size {text!r}: use H or HxW, e.g. 224 or 320x320")
    return (size[0], size[-1])


def _at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise QzError(f"--{name.replace('_', '-')} must be at least {minimum}; got {value}.")


def _engines(text: str | None) -> list[str]:
    engines = [e for e in (text or ",".join(DEFAULT_ENGINES)).split(",") if e]
    for engine in engines:
        if engine not in supported_backends():
            raise invalid_choice("engine", engine, supported_backends(), hint="(this PyTorch build's engines)")
    if not engines:
        raise QzError("--engines names no engine; give e.g. x86,qnnpack.")
    return engines


def _check_outputs(args: argparse.Namespace, block: str) -> None:
    """Checks --out and --readme before any work, and --from against a model selection."""
    check_output_dir(args.out, "--out")
    if args.readme:
        check_readme(args.readme, block)
    if args.from_json and (args.models or args.task or args.all_models):
        raise QzError("--from re-renders saved results: pass it without model names, --task or --all.")


def _update_readme(path: str | None, block: str, markdown: str) -> None:
    if path:
        changed = update_readme_block(path, block, markdown)
        print(f"{path}: block {block!r} {'updated' if changed else 'unchanged'}")


def _merge_results(paths: Sequence[str], read: Callable[[str], tuple[list[Any], dict]]) -> tuple[list[Any], dict]:
    """Rows of several saved results (a later file's row replaces an earlier one of the same model).

    Order is kept: a replaced row stays where it first stood.
    """
    rows: dict[str, Any] = {}
    metas = []
    for path in paths:
        found, meta = read(path)
        metas.append(meta | {"source": path})
        rows |= {getattr(r, "model", None) or r.name: r for r in found}
    meta = dict(metas[0]) if len(metas) == 1 else metas[0] | {"merged": metas}
    return list(rows.values()), meta


def _print_written(paths: dict[str, Any]) -> None:
    print("written: " + ", ".join(str(p) for p in paths.values()))


def _bench_meta(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    from qz_core.tools.common import machine_info

    meta = machine_info(args.threads, backend) | {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "weights": args.weights or "random (settled by the model's task)",
        "calib_batches": args.calib_batches,
        "ort_quantize": args.ort_quantize,
        "budget_s": args.budget,
    }
    if args.openvino:
        from qz_core.openvino_runtime import openvino_version

        meta["openvino"] = openvino_version()
    return meta


def _publish_bench(rows: list[Any], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    from qz_core.tools.bench import bench_markdown, write_bench_outputs

    paths = write_bench_outputs(rows, args.out, meta)
    print(bench_markdown(rows, meta))
    _print_written(paths)
    _update_readme(args.readme, BENCH_BLOCK, bench_markdown(rows, meta, collapse=True))


def _cmd_bench(args: argparse.Namespace) -> int:
    from qz_core.tools.bench import read_bench_json, run_benchmark, write_bench_outputs
    from qz_core.tools.common import machine_info, select_models

    _check_outputs(args, BENCH_BLOCK)
    if args.from_json:
        rows, meta = _merge_results(args.from_json, read_bench_json)
        _publish_bench(rows, args, meta)
        return 0
    _at_least(args, 1, "batch_size", "threads", "rounds", "calib_batches")
    _at_least(args, 0, "warmup")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise QzError(f"--budget must be a positive number of seconds; got {args.budget}.")
    if args.ort_quantize and not args.ort:
        raise QzError("--ort-quantize needs onnxruntime timing: drop --no-ort.")
    if args.openvino:
        from qz_core.openvino_runtime import import_openvino

        import_openvino()
    names = select_models(args.models, task=args.task, all_models=args.all_models)
    backend = resolve_backend(args.backend)
    meta = _bench_meta(args, backend)
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
        openvino=args.openvino,
        compare_torchvision=args.torchvision,
        calib_batches=args.calib_batches,
        input_size=args.input_size,
        budget_s=args.budget,
        # Saved after every model: a sweep stopped half-way keeps what it measured.
        on_row=lambda done: write_bench_outputs(done, args.out, meta | {"partial": len(done)}, plots=False),
    )
    meta["load_average_end"] = machine_info(args.threads, backend)["load_average"]
    _publish_bench(rows, args, meta)
    failed = [r.model for r in rows if r.error]
    if failed:
        print(f"{len(failed)} of {len(rows)} models failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and args.strict else 0


def _publish_support(results: list[Any], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    from qz_core.tools.support import support_markdown, write_support_outputs

    paths = write_support_outputs(results, args.out, meta)
    markdown = support_markdown(results)
    print(markdown)
    _print_written(paths)
    _update_readme(args.readme, SUPPORT_BLOCK, markdown)


def _cmd_support(args: argparse.Namespace) -> int:
    from qz_core.tools.common import machine_info, select_models
    from qz_core.tools.support import read_support_json, run_support

    _check_outputs(args, SUPPORT_BLOCK)
    if args.from_json:
        results, meta = _merge_results(args.from_json, read_support_json)
        _publish_support(results, args, meta)
        return 0
    _at_least(args, 10, "opset")  # QuantizeLinear, which INT8 exports need, came in opset 10
    engines = _engines(args.engines)
    names = select_models(args.models, task=args.task, all_models=args.all_models or not (args.models or args.task))
    results = run_support(names, engines=engines, opset=args.opset, onnx=args.onnx)
    meta = machine_info(1, engines[0]) | {"engines": engines, "opset": args.opset}
    _publish_support(results, args, meta)
    return 0


def _selection(p: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="names or wildcards, e.g. 'resnet*' (see 'qz list')")
    installed = f" (installed: {', '.join(tasks)})" if tasks else ""
    p.add_argument("--task", metavar="TASK", help=f"every model of this task, or filter the names given{installed}")
    p.add_argument("--all", action="store_true", dest="all_models", help="every registered model")


def _outputs(p: argparse.ArgumentParser, out: str, block: str) -> None:
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    p.add_argument("--readme", default=None, metavar="README", help=f"rewrite the {block} block of this markdown file")
    p.add_argument(
        "--from",
        dest="from_json",
        nargs="+",
        metavar="JSON",
        help="re-render the outputs and --readme from saved .json results (merged in order; a later row of a "
        "model replaces an earlier one) without running anything",
    )


def _add_bench(sub: argparse._SubParsersAction, tasks: Sequence[str]) -> None:
    p = sub.add_parser(
        "bench",
        help="FP32 vs INT8 latency (eager and onnxruntime), sizes and memory; CSV, JSON, markdown, PNG",
        description="Quantizes each model (random or given weights) and times FP32/INT8 eager and "
        "onnxruntime interleaved in one process. Run it on a quiet machine.",
    )
    _selection(p, tasks)
    p.add_argument("--batch-size", type=int, default=1, help="inputs per timed call (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of PyTorch and onnxruntime (default: 1)")
    p.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each variant first (default: 3)")
    p.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True, help="time ONNX in onnxruntime")
    p.add_argument(
        "--ort-quantize",
        action="store_true",
        help="also quantize the FP32 ONNX with onnxruntime's own quantize_static (S8S8 defaults; U8S8 per-channel, "
        "QDQ and QOperator) on the same calibration data and time it against qz's INT8 ONNX",
    )
    p.add_argument(
        "--openvino",
        action="store_true",
        help="also time the FP32 and INT8 ONNX files in OpenVINO (needs pip install 'qz-core[openvino]'); the deployed "
        "ratio then takes the fastest INT8 of eager, onnxruntime and OpenVINO",
    )
    p.add_argument("--torchvision", action="store_true", help="also time torchvision's own INT8 model of the same name")
    p.add_argument("--weights", default=None, help="weights for every model (DEFAULT, a path); random when omitted")
    p.add_argument(
        "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
    )
    p.add_argument("--calib-batches", type=int, default=4, help="random calibration batches of 2 inputs (default: 4)")
    p.add_argument("--input-size", type=_input_size, default=None, help="H or HxW instead of each model's own")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timing seconds per model: slower models get fewer rounds (at least 5); default: always --rounds",
    )
    _outputs(p, "bench-results", BENCH_BLOCK)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a model fails")
    p.set_defaults(func=_cmd_bench)


def _add_support(sub: argparse._SubParsersAction, tasks: Sequence[str]) -> None:
    p = sub.add_parser(
        "support",
        help="support matrix: PTQ, QAT, INT8 per engine, FP32/INT8 ONNX, float islands (markdown + JSON)",
        description="Runs every step of qz on each model (random weights; every model when none is named) "
        "and tabulates what worked.",
    )
    _selection(p, tasks)
    p.add_argument(
        "--engines", default=None, help=f"comma-separated quantized engines (default: {','.join(DEFAULT_ENGINES)})"
    )
    p.add_argument("--opset", type=int, default=13, help="ONNX opset of the exports (default: 13)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="export and run ONNX")
    _outputs(p, "support-results", SUPPORT_BLOCK)
    p.set_defaults(func=_cmd_support)


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz bench`` and ``qz support`` to the ``qz`` command's subparsers."""
    tasks = list_tasks()
    _add_bench(sub, tasks)
    _add_support(sub, tasks)
