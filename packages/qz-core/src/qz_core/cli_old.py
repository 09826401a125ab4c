"""The ``qz`` command: ``qz list``, ``qz quantize``, and subcommands that task packages add."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

import torch

from qz_core import commands
from qz_core.backend import supported_backends
from qz_core.bench import model_size_mb
from qz_core.data import image_loader
from qz_core.errors import QzError
from qz_core.fusion import FUSE_LEVELS
from qz_core.onnx_export import export_onnx
from qz_core.registry import TASKS, get_model_entry, get_model_transforms, list_models
from qz_core.workflow import calibrate, convert, save_quantized, train_qat

COMMAND_ENTRY_POINT_GROUP = "qz.commands"


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern or None, task=args.task)
    for name in names:
        entry = get_model_entry(name)
        print(f"{name:32s} {entry.task:15s} {entry.weights.__name__ if entry.weights else '-'}")
    print(f"{len(names)} models", file=sys.stderr)
    return 0


preprocessing = get_model_transforms  # the name earlier code used


def task_subcommands(sub: argparse._SubParsersAction, command: str) -> argparse._SubParsersAction:
    """The TASK subparsers of a shared command (``qz eval TASK``) that task packages add to."""
    parser = sub.choices[command]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_eval_arguments(p: argparse.ArgumentParser, *, task: str, weights_help: str, data_help: str) -> None:
    """The options every ``qz eval TASK`` shares: model and weights, the data, FP32 vs INT8 (PTQ or an
    INT8 file), backend and observer, sampling, output. A task adds its own (splits, batch size) beside them.
    """
    from qz_core.qconfig import ACTIVATION_OBSERVERS

    p.add_argument("--model", default=None, help=f"model name (see 'qz list --task {task}'); optional with --int8")
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--data", required=True, help=data_help)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quantize", choices=["ptq"], default=None, help="also quantize (PTQ) and evaluate INT8")
    mode.add_argument("--int8", default=None, help="evaluate this INT8 model file (from 'qz quantize')")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches for --quantize ptq")
    p.add_argument("--backend", choices=supported_backends(), default=None, help="default: the platform's")
    p.add_argument(
        "--activation-observer", choices=sorted(ACTIVATION_OBSERVERS), default=None, help="default: the engine's"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of N images")
    p.add_argument("--num-classes", type=int, default=None, help="class count of a checkpoint with its own head")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="also write the results as JSON to this file ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def report_eval(result: Any, json_target: str | None) -> int:
    """Prints an evaluation result's FP32-vs-INT8 table (``result.table()``) and, if asked, its JSON
    (``result.to_dict()``) to a file or, for ``'-'``, to stdout. Returns the exit status 0.
    """
    import json

    print()
    print(result.table())
    if json_target:
        text = json.dumps(result.to_dict(), indent=2)
        if json_target == "-":
            print(text)
        else:
            with open(json_target, "w") as file:
                file.write(text + "\n")
            print(f"results written to {json_target}", file=sys.stderr)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    entry = get_model_entry(args.model)
    options: dict[str, Any] = {
        "backend": args.backend,
        "fuse_level": args.fuse_level,
        "float_modules": _csv(args.float_modules),
        "quantize_from": args.quantize_from,
    }
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    transform = get_model_transforms(args.model, args.weights)
    calib = image_loader(
        args.calib, transform, batch_size=args.batch_size, num_workers=args.workers, purpose="calibration"
    )
    float_model = entry.builder(weights=args.weights, **({"num_classes": args.num_classes} if args.num_classes else {}))
    model = entry.builder(weights=args.weights, quantize=True, is_qat=args.qat, **options)
    if args.qat:
        loss = entry.meta.get("qat_loss")
        if loss is None:
            raise QzError(f"QAT from the command line is not available for {args.model!r} ({entry.task}) yet.")
        if not args.train:
            raise QzError("--qat needs --train DIR: a labelled image folder (one subfolder per class).")
        train = image_loader(
            args.train,
            transform,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle=True,
            purpose="training",
            labeled=True,
        )
        train_qat(model, train, loss(), epochs=args.epochs, lr=args.lr)
    else:
        seen = calibrate(model, calib, num_batches=args.calib_batches, fraction=args.calib_fraction)
        print(f"calibrated on {seen} batches")
    int8 = convert(model)
    save_quantized(int8, args.out)
    fp32_mb, int8_mb = model_size_mb(float_model), model_size_mb(int8)
    print(f"INT8 model saved to {args.out}: {int8_mb:.2f} MB (FP32 {fp32_mb:.2f} MB, ratio {int8_mb / fp32_mb:.2f})")
    if args.onnx:
        example = torch.randn(1, 3, *entry.input_size)
        print(export_onnx(int8, args.onnx, example, opset=args.opset))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``qz`` argument parser, with the subcommands of every installed task package."""
    parser = argparse.ArgumentParser(prog="qz", description="INT8 quantization model zoo for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models (wildcards allowed)")
    p.add_argument("pattern", nargs="*", help="wildcard patterns, e.g. 'resnet*'")
    p.add_argument("--task", choices=TASKS)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("quantize", help="quantize a model (PTQ or QAT) and save it as INT8")
    p.add_argument("model", help="model name (see 'qz list')")
    p.add_argument("--weights", default=None, help="weights name (DEFAULT, IMAGENET1K_V2, ...) or checkpoint path")
    p.add_argument("--calib", required=True, help="calibration image folder (flat or one subfolder per class)")
    p.add_argument("--out", required=True, help="output INT8 model file (.pt)")
    p.add_argument("--onnx", help="also export the INT8 model to this ONNX file")
    p.add_argument("--num-classes", type=int, default=None, help="class count of a checkpoint with its own head")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--backend", choices=supported_backends(), default=None, help="default: the platform's")
    p.add_argument("--fuse-level", choices=FUSE_LEVELS, default="all")
    p.add_argument("--float-modules", default="", help="comma-separated submodules kept in float")
    p.add_argument("--quantize-from", default=None, help="stage where quantization starts")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--calib-batches", type=int, default=None)
    group.add_argument("--calib-fraction", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--qat", action="store_true", help="quantization-aware training instead of calibration")
    p.add_argument("--train", help="labelled training folder for --qat")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("eval", help="evaluate FP32 and INT8 models on a validation set")
    p.add_subparsers(dest="task", required=True, metavar="TASK")
    commands.register(sub)  # qz bench, qz support

    for ep in entry_points(group=COMMAND_ENTRY_POINT_GROUP):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qz`` command; bad input exits with status 2 and a one-line reason."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except QzError as exc:
        print(f"qz {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
