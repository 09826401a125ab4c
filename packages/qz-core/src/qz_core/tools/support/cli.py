"""``qz support``: the support matrix from the command line (parsing and checks; the work is ``tools.support``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from qz_core.backend import supported_backends
from qz_core.errors import QzError, invalid_choice
from qz_core.tools.cli_common import (
    at_least,
    check_outputs,
    merge_results,
    outputs,
    print_written,
    selection,
    update_readme,
)
from qz_core.tools.readme import SUPPORT_BLOCK
from qz_core.tools.support.probe import DEFAULT_ENGINES


def _engines(text: str | None) -> list[str]:
    engines = [e for e in (text or ",".join(DEFAULT_ENGINES)).split(",") if e]
    for engine in engines:
        if engine not in supported_backends():
            raise invalid_choice("engine", engine, supported_backends(), hint="(this PyTorch build's engines)")
    if not engines:
        raise QzError("--engines names no engine; give e.g. x86,qnnpack.")
    return engines


def _publish_support(results: list[Any], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    from qz_core.tools.support import support_markdown, write_support_outputs

    paths = write_support_outputs(results, args.out, meta)
    markdown = support_markdown(results)
    print(markdown)
    print_written(paths)
    update_readme(args.readme, SUPPORT_BLOCK, markdown)


def _cmd_support(args: argparse.Namespace) -> int:
    from qz_core.tools.common import machine_info, select_models
    from qz_core.tools.support import read_support_json, run_support

    check_outputs(args, SUPPORT_BLOCK)
    if args.from_json:
        results, meta = merge_results(args.from_json, read_support_json)
        _publish_support(results, args, meta)
        return 0
    at_least(args, 10, "opset")  # QuantizeLinear, which INT8 exports need, came in opset 10
    engines = _engines(args.engines)
    names = select_models(args.models, task=args.task, all_models=args.all_models or not (args.models or args.task))
    results = run_support(names, engines=engines, opset=args.opset, onnx=args.onnx)
    meta = machine_info(1, engines[0]) | {"engines": engines, "opset": args.opset}
    _publish_support(results, args, meta)
    return 0


def add_support_command(sub: argparse._SubParsersAction, tasks: Sequence[str]) -> None:
    p = sub.add_parser(
        "support",
        help="support matrix: PTQ, QAT, INT8 per engine, FP32/INT8 ONNX, float islands (markdown + JSON)",
        description="Runs every step of qz on each model (random weights; every model when none is named) "
        "and tabulates what worked.",
    )
    selection(p, tasks)
    p.add_argument(
        "--engines", default=None, help=f"comma-separated quantized engines (default: {','.join(DEFAULT_ENGINES)})"
    )
    p.add_argument("--opset", type=int, default=13, help="ONNX opset of the exports (default: 13)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="export and run ONNX")
    outputs(p, "support-results", SUPPORT_BLOCK)
    p.set_defaults(func=_cmd_support)
