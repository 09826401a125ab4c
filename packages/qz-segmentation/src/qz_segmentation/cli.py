"""``qz eval segmentation``: mIoU and pixel accuracy, FP32 beside INT8, on a Pascal VOC-layout folder."""

from __future__ import annotations

import argparse
import json
import os
import sys

from qz_core.backend import supported_backends
from qz_core.cli import task_subcommands
from qz_core.qconfig import ACTIVATION_OBSERVERS


def _cmd_eval(args: argparse.Namespace) -> int:
    from qz_segmentation.evaluate import evaluate_segmenter

    result = evaluate_segmenter(
        args.model,
        data=args.data,
        split=args.split,
        weights=args.weights,
        quantize=args.quantize,
        int8=args.int8,
        calib_split=args.calib_split,
        calib_batches=args.calib_batches,
        backend=args.backend,
        activation_observer=args.activation_observer,
        limit=args.limit,
        num_classes=args.num_classes,
        aux_loss=True if args.aux_loss else None,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print()
    print(result.table())
    if args.json:
        text = json.dumps(result.to_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as file:
                file.write(text + "\n")
            print(f"results written to {args.json}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz eval segmentation`` to the ``qz`` command."""
    tasks = task_subcommands(sub, "eval")
    p = tasks.add_parser(
        "segmentation",
        help="Pascal VOC mIoU and pixel accuracy, FP32 vs INT8",
        description="Mean IoU and pixel accuracy on a Pascal VOC-layout folder (JPEGImages/, SegmentationClass/ "
        "PNG masks with 255 = ignore, ImageSets/Segmentation/<split>.txt), FP32 and INT8 side by side.",
    )
    p.add_argument("--model", default=None, help="model name (see 'qz list --task segmentation'); optional with --int8")
    p.add_argument("--weights", default=None, help="weights name (DEFAULT, ...) or float checkpoint")
    p.add_argument("--data", required=True, help="VOC folder (or a parent holding VOC2012/ or VOCdevkit/VOC2012/)")
    p.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt to evaluate (default: val)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quantize", choices=["ptq"], default=None, help="also quantize (PTQ) and evaluate INT8")
    mode.add_argument("--int8", default=None, help="evaluate this INT8 model file (from 'qz quantize')")
    p.add_argument("--calib-split", default=None, help="split that calibrates PTQ (default: held-out images)")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration images")
    p.add_argument("--backend", choices=supported_backends(), default=None, help="default: the platform's")
    p.add_argument(
        "--activation-observer", choices=sorted(ACTIVATION_OBSERVERS), default=None, help="default: the engine's"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of N images")
    p.add_argument("--num-classes", type=int, default=None, help="class count of a checkpoint with its own head")
    p.add_argument("--aux-loss", action="store_true", help="the checkpoint holds an aux classifier")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="also write the results as JSON to this file ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_eval)
