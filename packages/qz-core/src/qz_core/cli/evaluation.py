"""What every ``qz eval TASK`` shares: its options, and its FP32-vs-INT8 table and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from qz_core.backend import supported_backends
from qz_core.cli.arguments import non_negative_int, positive_int
from qz_core.files import write_text_atomic
from qz_core.qconfig import ACTIVATION_OBSERVERS

WORKERS = min(4, os.cpu_count() or 1)


def add_eval_arguments(p: argparse.ArgumentParser, *, task: str, weights_help: str, data_help: str) -> None:
    """Adds the options every ``qz eval TASK`` shares: model and weights, data, FP32 vs INT8, backend, sampling, output.

    A task adds its own (splits, batch size) beside them.
    """
    p.add_argument("--model", default=None, help=f"model name (see 'qz list --task {task}'); optional with --int8")
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--data", required=True, help=data_help)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quantize", choices=["ptq"], default=None, help="also quantize (PTQ) and evaluate INT8")
    mode.add_argument("--int8", default=None, help="evaluate this INT8 model file (from 'qz quantize')")
    p.add_argument(
        "--calib-batches", type=positive_int, default=16, help="calibration batches for --quantize ptq (default: 16)"
    )
    p.add_argument(
        "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
    )
    p.add_argument(
        "--activation-observer",
        choices=sorted(ACTIVATION_OBSERVERS),
        default=None,
        help="INT8 activation observer (default: the engine's)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate a seeded sample of N images (default: all)",
    )
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="class count of a checkpoint with its own head"
    )
    p.add_argument(
        "--workers", type=non_negative_int, default=WORKERS, help=f"data loading processes (default: {WORKERS})"
    )
    p.add_argument("--json", default=None, help="also write the results as JSON to this file ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def shared_eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluator keywords every task takes from ``add_eval_arguments``'s options (the model name aside)."""
    return {
        "data": args.data,
        "weights": args.weights,
        "quantize": args.quantize,
        "int8": args.int8,
        "calib_batches": args.calib_batches,
        "backend": args.backend,
        "activation_observer": args.activation_observer,
        "limit": args.limit,
        "num_classes": args.num_classes,
        "workers": args.workers,
        "progress": not args.no_progress,
    }


def report_eval(result: Any, json_target: str | None) -> int:
    """Prints ``result.table()`` and, if asked, ``result.to_dict()`` as JSON to a file or ('-') stdout.

    Returns:
        The exit status 0.
    """
    print()
    print(result.table())
    if json_target:
        text = json.dumps(result.to_dict(), indent=2)
        if json_target == "-":
            print(text)
        else:
            write_text_atomic(json_target, text + "\n")
            print(f"results written to {json_target}", file=sys.stderr)
    return 0
