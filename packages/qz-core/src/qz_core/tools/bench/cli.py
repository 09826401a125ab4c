"""``qz bench`` from the command line: options, checks before any work, the run, and the publishing guard.

``add_bench_command`` adds the subcommand; ``qz_core.tools.cli`` calls it beside ``qz support`` and shares
its selection, output and merge helpers. ``--readme`` refuses rows timed on a busy machine (``BenchRow.busy``)
unless ``--allow-busy``; ``--retime-busy`` times only those rows of a saved run again, with that run's
settings, and merges them in.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qz_core.backend import resolve_backend, supported_backends
from qz_core.errors import QzError
from qz_core.tools import cli_common as shared
from qz_core.tools.bench.anchors import ANCHORS, check_anchors
from qz_core.tools.readme import BENCH_BLOCK


def _anchors(text: str) -> tuple[str, ...]:
    return tuple(a for a in text.split(",") if a)


def run_settings(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """``run_benchmark``'s keywords from the command line (saved in ``meta["settings"]`` for ``--retime-busy``)."""
    return {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "weights": args.weights,
        "backend": backend,
        "ort": args.ort,
        "ort_quantize": args.ort_quantize,
        "openvino": args.openvino or "nncf" in args.anchors,
        "anchors": list(args.anchors),
        "compare_torchvision": args.torchvision,
        "calib_batches": args.calib_batches,
        "input_size": list(args.input_size) if args.input_size else None,
        "budget_s": args.budget,
    }


def bench_meta(settings: dict[str, Any]) -> dict[str, Any]:
    """What the numbers were measured on and how, saved beside them."""
    from qz_core.tools.common import machine_info

    meta = machine_info(settings["threads"], settings["backend"]) | {
        "batch_size": settings["batch_size"],
        "rounds": settings["rounds"],
        "warmup": settings["warmup"],
        "weights": settings["weights"] or "random (settled by the model's task)",
        "calib_batches": settings["calib_batches"],
        "ort_quantize": settings["ort_quantize"],
        "budget_s": settings["budget_s"],
        "settings": settings,
    }
    if settings["openvino"]:
        from qz_core.openvino_runtime import openvino_version

        meta["openvino"] = openvino_version()
    if settings["anchors"]:
        import nncf

        meta["nncf"] = nncf.__version__
    return meta


def _measure(
    names: Sequence[str], settings: dict[str, Any], meta: dict[str, Any], save: Callable[[list[Any]], Any]
) -> list[Any]:
    """Runs the benchmark, handing the rows to ``save`` after every model (a stopped sweep keeps what it measured)."""
    from qz_core.tools.bench import run_benchmark
    from qz_core.tools.common import machine_info

    keywords = settings | {"input_size": tuple(settings["input_size"]) if settings["input_size"] else None}
    rows = run_benchmark(names, **keywords, on_row=save)
    meta["load_average_end"] = machine_info(settings["threads"], settings["backend"])["load_average"]
    return rows


def check_publishable(rows: Sequence[Any], allow_busy: bool, results: str) -> None:
    """Refuses, before a README is written, rows that were timed on a busy machine (unless ``allow_busy``).

    Raises:
        QzError: one line naming the busy rows and the two ways on.
    """
    busy = [r.model for r in rows if r.busy]
    if busy and not allow_busy:
        raise QzError(
            f"Not writing the README block: {len(busy)} row(s) timed on a busy machine ({', '.join(busy)}). "
            f"Re-time them on a quiet one with 'qz bench --from {results} --retime-busy', or pass --allow-busy."
        )


def retime_busy(rows: list[Any], meta: dict[str, Any], out: str) -> tuple[list[Any], dict[str, Any]]:
    """Times the busy rows again with the saved run's settings; each new row replaces the old where it stood.

    Raises:
        QzError: the saved results do not say how they were run.
    """
    busy = [r.model for r in rows if r.busy]
    if not busy:
        print("No row is flagged busy: nothing to re-time.")
        return rows, meta
    settings = meta.get("settings")
    if not settings:
        raise QzError("The saved results do not record their run settings (older qz): run those models again.")
    from qz_core.tools.bench import write_bench_outputs

    def merged_with(done: list[Any]) -> list[Any]:
        fresh = {r.model: r for r in done}
        return [fresh.get(r.model, r) for r in rows]

    def save(done: list[Any]) -> None:
        write_bench_outputs(merged_with(done), out, meta, plots=False)

    print(f"Re-timing {len(busy)} busy row(s): {', '.join(busy)}")
    merged = merged_with(_measure(busy, settings, meta, save))
    record = {"models": busy, "load_average_end": meta.pop("load_average_end", None)}
    return merged, meta | {"retimed": [*meta.get("retimed", []), record]}


def _publish(rows: list[Any], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    from qz_core.tools.bench import bench_markdown, write_bench_outputs

    paths = write_bench_outputs(rows, args.out, meta)
    print(bench_markdown(rows, meta))
    shared.print_written(paths)
    if args.readme:
        check_publishable(rows, args.allow_busy, str(paths["json"]))
    shared.update_readme(args.readme, BENCH_BLOCK, bench_markdown(rows, meta, collapse=True))


def _check_run(args: argparse.Namespace) -> None:
    """Checks the timing options before any work."""
    shared.at_least(args, 1, "batch_size", "threads", "rounds", "calib_batches")
    shared.at_least(args, 0, "warmup")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise QzError(f"--budget must be a positive number of seconds; got {args.budget}.")
    if args.ort_quantize and not args.ort:
        raise QzError("--ort-quantize needs onnxruntime timing: drop --no-ort.")
    if args.openvino:
        from qz_core.openvino_runtime import import_openvino

        import_openvino()
    check_anchors(args.anchors)


def cmd_bench(args: argparse.Namespace) -> int:
    """``qz bench``: time the selected models (or re-render, merge or re-time saved results) and publish them."""
    from qz_core.tools.bench import read_bench_json, write_bench_outputs
    from qz_core.tools.common import select_models

    shared.check_outputs(args, BENCH_BLOCK)
    if args.retime_busy and not args.from_json:
        raise QzError("--retime-busy re-times the busy rows of saved results: give them with --from JSON.")
    if args.from_json:
        rows, meta = shared.merge_results(args.from_json, read_bench_json)
        if args.retime_busy:
            rows, meta = retime_busy(rows, meta, args.out)
        _publish(rows, args, meta)
        return 0
    _check_run(args)
    names = select_models(args.models, task=args.task, all_models=args.all_models)
    settings = run_settings(args, resolve_backend(args.backend))
    meta = bench_meta(settings)

    def save(done: list[Any]) -> None:
        write_bench_outputs(done, args.out, meta | {"partial": len(done)}, plots=False)

    rows = _measure(names, settings, meta, save)
    _publish(rows, args, meta)
    failed = [r.model for r in rows if r.error]
    if failed:
        print(f"{len(failed)} of {len(rows)} models failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and args.strict else 0


def _runtime_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--anchors",
        type=_anchors,
        default=(),
        metavar="NAME[,NAME]",
        help=f"also quantize the same float model with another tool on the same calibration batches and time it in "
        f"the same rounds ({', '.join(ANCHORS)}: NNCF's PTQ, timed in OpenVINO; needs pip install 'qz-core[bench]'; "
        "turns --openvino on)",
    )
    p.add_argument("--torchvision", action="store_true", help="also time torchvision's own INT8 model of the same name")


def _publishing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a model fails")
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="let --readme publish rows timed while other processes kept the CPU busy (refused otherwise)",
    )
    p.add_argument(
        "--retime-busy",
        action="store_true",
        help="with --from: time the rows flagged busy again, with the saved run's settings, and merge them in",
    )


def add_bench_command(sub: argparse._SubParsersAction, tasks: Sequence[str]) -> None:
    """Adds ``qz bench`` to the ``qz`` command's subparsers."""
    p = sub.add_parser(
        "bench",
        help="FP32 vs INT8 latency (eager, onnxruntime, OpenVINO, anchors), sizes and memory; CSV, JSON, markdown, PNG",
        description="Quantizes each model (random or given weights) and times FP32/INT8 eager and "
        "onnxruntime interleaved in one process. Run it on a quiet machine.",
    )
    shared.selection(p, tasks)
    p.add_argument("--batch-size", type=int, default=1, help="inputs per timed call (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of PyTorch and onnxruntime (default: 1)")
    p.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each variant first (default: 3)")
    _runtime_options(p)
    p.add_argument("--weights", default=None, help="weights for every model (DEFAULT, a path); random when omitted")
    p.add_argument(
        "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
    )
    p.add_argument("--calib-batches", type=int, default=4, help="random calibration batches of 2 inputs (default: 4)")
    p.add_argument("--input-size", type=shared.input_size, default=None, help="H or HxW instead of each model's own")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timing seconds per model: slower models get fewer rounds (at least 5); default: always --rounds",
    )
    shared.outputs(p, "bench-results", BENCH_BLOCK)
    _publishing_options(p)
    p.set_defaults(func=cmd_bench)
