"""``qz list``, ``qz quantize``, ``qz predict`` and ``qz export``: the same verbs for every task."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from qz_core.backend import supported_backends
from qz_core.cli.arguments import onnx_opset, positive_int
from qz_core.fusion import FUSE_LEVELS, RELU6_MODES
from qz_core.job import EXPORT_FORMATS, ModelSource, QuantizeRequest, export_model, predict_images, quantize_model
from qz_core.registry import get_model_spec, list_models, list_tasks

WORKERS = min(4, os.cpu_count() or 1)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _model_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    return kwargs


def _cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern or None, task=args.task)
    specs = [get_model_spec(n) for n in names]
    width = max((len(n) for n in names), default=10) + 2
    for spec in specs:
        weights = spec.weights_enum.__name__ if spec.weights_enum else "checkpoint file"
        print(f"{spec.name:{width}s}{spec.task:16s}{spec.family:14s}{weights}")
    print(f"{len(names)} model{'' if len(names) == 1 else 's'}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    options = {
        "backend": args.backend,
        "fuse_level": args.fuse_level,
        "float_modules": _csv(args.float_modules),
        "quantize_from": args.quantize_from,
        "relu6": args.relu6,
    }
    request = QuantizeRequest(
        model=args.model,
        out=Path(args.out),
        weights=args.weights,
        calib=Path(args.calib) if args.calib else None,
        qat=args.qat,
        train=Path(args.train) if args.train else None,
        onnx=Path(args.onnx) if args.onnx else None,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        workers=args.workers,
        calib_batches=args.calib_batches,
        calib_fraction=args.calib_fraction,
        opset=args.opset,
        model_kwargs=_model_kwargs(args) | options,
        progress=not args.no_progress,
        max_drop=args.max_drop,
        val=Path(args.val) if args.val else None,
    )
    _show_warnings()
    print(quantize_model(request).summary())
    return 0


def _show_warnings() -> None:
    warnings.filterwarnings("always", message=".*weights are random.*")
    warnings.showwarning = lambda message, *rest: print(f"qz: warning: {message}", file=sys.stderr)


def _source(args: argparse.Namespace) -> ModelSource:
    return ModelSource(args.model, args.weights, Path(args.int8) if args.int8 else None)


def _cmd_predict(args: argparse.Namespace) -> int:
    _show_warnings()
    written = predict_images(_source(args), [Path(p) for p in args.images], Path(args.out), **_model_kwargs(args))
    for path in written:
        print(path)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _show_warnings()
    reports = export_model(_source(args), Path(args.out), opset=args.opset, format=args.format, **_model_kwargs(args))
    for report in reports:
        print(report)
    return 0


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="FP32 weights: enum name (DEFAULT, ...) or checkpoint file")
    p.add_argument("--int8", default=None, help="INT8 model file written by 'qz quantize'")
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="class count of a checkpoint with its own head"
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds ``list``, ``quantize``, ``predict`` and ``export``."""
    p = sub.add_parser("list", help="list registered models (wildcards allowed)")
    p.add_argument("pattern", nargs="*", help="wildcard patterns, e.g. 'mobile*'")
    p.add_argument("--task", choices=list_tasks(), help="only models of this task")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("quantize", help="quantize a model (PTQ or QAT), save it as INT8, optionally export ONNX")
    p.add_argument("model", help="model name (see 'qz list')")
    p.add_argument(
        "--weights", default=None, help="enum weights name (DEFAULT, ...) or checkpoint file; random if left out"
    )
    p.add_argument("--calib", default=None, help="calibration image folder (PTQ), in a layout of the model's task")
    p.add_argument("--out", required=True, help="INT8 model file to write (.pt)")
    p.add_argument("--onnx", default=None, help="also export the INT8 model to this ONNX file")
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="class count of a checkpoint with its own head"
    )
    p.add_argument("--opset", type=onnx_opset, default=13, help="ONNX opset, 10 or more (default: 13)")
    p.add_argument(
        "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
    )
    p.add_argument("--fuse-level", choices=FUSE_LEVELS, default="all", help="which conv-bn-relu runs to fuse")
    p.add_argument("--float-modules", default="", help="comma-separated submodules kept in float")
    p.add_argument("--quantize-from", default=None, help="submodule where quantization starts (before it stays float)")
    p.add_argument(
        "--relu6",
        choices=RELU6_MODES,
        default="clamp",
        help="a fused conv-bn-ReLU6 in INT8: output range ends at 6 ('clamp', default; exact ReLU6 on qnnpack, "
        "saturates at 12 on x86), a ReLU6 on every engine ('exact', a quantized ReLU6 more on x86), or a ReLU ('relu')",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--calib-batches", type=int, default=None, help="calibrate on at most this many batches")
    group.add_argument(
        "--calib-fraction", type=float, default=None, help="calibrate on this fraction (0, 1] of the folder"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--workers", type=int, default=WORKERS, help=f"data loading processes (default: {WORKERS})")
    p.add_argument("--qat", action="store_true", help="quantization-aware training on --train instead of calibration")
    p.add_argument("--train", default=None, help="labelled training folder for --qat, in a layout of the model's task")
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs (default: 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT learning rate (default: 1e-4)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="keep the most sensitive layers (and those slower in INT8) in float until the task metric on --val is "
        "within this of FP32, e.g. 0.5 top-1 points",
    )
    p.add_argument("--val", default=None, help="labelled validation folder for --max-drop, in a training layout")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("predict", help="draw what a model predicts on images (FP32 beside INT8 when both are given)")
    p.add_argument("model", nargs="?", default=None, help="model name (optional with --int8)")
    p.add_argument("images", nargs="+", help="image files or folders")
    _add_source(p)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export",
        help="export an FP32 or INT8 model to ONNX (checked in onnxruntime) or OpenVINO IR (checked in OpenVINO)",
    )
    p.add_argument("model", nargs="?", default=None, help="model name (optional with --int8)")
    _add_source(p)
    p.add_argument(
        "--out",
        required=True,
        help="file to write: .onnx, or .xml for --format openvino (its .bin beside it); with both --weights and "
        "--int8 also FILE_int8.onnx / FILE_int8.xml",
    )
    p.add_argument(
        "--format",
        choices=tuple(EXPORT_FORMATS),
        default="onnx",
        help="onnx (default), or openvino: OpenVINO IR converted from the ONNX export "
        "(pip install 'qz-core[openvino]')",
    )
    p.add_argument("--opset", type=onnx_opset, default=13, help="ONNX opset, 10 or more (default: 13)")
    p.set_defaults(func=_cmd_export)
