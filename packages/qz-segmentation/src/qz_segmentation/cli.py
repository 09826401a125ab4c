"""``qz eval segmentation``: mIoU and pixel accuracy, FP32 beside INT8, on a Pascal VOC-layout folder."""

from __future__ import annotations

import argparse

from qz_core.cli import add_eval_arguments, report_eval, task_subcommands


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
    return report_eval(result, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz eval segmentation`` to the ``qz`` command."""
    tasks = task_subcommands(sub, "eval")
    p = tasks.add_parser(
        "segmentation",
        help="Pascal VOC mIoU and pixel accuracy, FP32 vs INT8",
        description="Mean IoU and pixel accuracy on a Pascal VOC-layout folder (JPEGImages/, SegmentationClass/ "
        "PNG masks with 255 = ignore, ImageSets/Segmentation/<split>.txt), FP32 and INT8 side by side.",
    )
    add_eval_arguments(
        p,
        task="segmentation",
        weights_help="weights name (DEFAULT, ...) or float checkpoint",
        data_help="VOC folder (or a parent holding VOC2012/ or VOCdevkit/VOC2012/)",
    )
    p.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt to evaluate (default: val)")
    p.add_argument("--calib-split", default=None, help="split that calibrates PTQ (default: held-out images)")
    p.add_argument("--aux-loss", action="store_true", help="the checkpoint holds an aux classifier")
    p.set_defaults(func=_cmd_eval)
