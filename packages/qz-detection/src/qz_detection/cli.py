"""``qz eval detection``: COCO box mAP, FP32 beside INT8, on a COCO-layout folder."""

from __future__ import annotations

import argparse

from qz_core.cli import add_eval_arguments, report_eval, task_subcommands
from qz_detection.coco import LABEL_MAPS


def _cmd_eval(args: argparse.Namespace) -> int:
    from qz_detection.evaluate import evaluate_detector

    result = evaluate_detector(
        args.model,
        data=args.data,
        split=args.split,
        annotations=args.annotations,
        weights=args.weights,
        quantize=args.quantize,
        int8=args.int8,
        calib_images=args.calib_images,
        calib_batches=args.calib_batches,
        backend=args.backend,
        activation_observer=args.activation_observer,
        limit=args.limit,
        num_classes=args.num_classes,
        label_map=args.label_map,
        image_size=args.image_size,
        workers=args.workers,
        progress=not args.no_progress,
    )
    return report_eval(result, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz eval detection`` to the ``qz`` command."""
    tasks = task_subcommands(sub, "eval")
    p = tasks.add_parser(
        "detection",
        help="COCO box mAP, FP32 vs INT8",
        description="COCO box mAP@[.5:.95], mAP@.5 and AR@100 (pycocotools) on a COCO-layout folder "
        "(<split>/ images and annotations/instances_<split>.json, or --annotations FILE with the images folder "
        "as --data), FP32 and INT8 side by side.",
    )
    add_eval_arguments(
        p,
        task="detection",
        weights_help="weights name (DEFAULT, COCO_V1, ...) or float checkpoint (YOLO: ultralytics .pt)",
        data_help="COCO folder holding <split>/ and annotations/ (with --annotations: the images folder)",
    )
    p.add_argument("--split", default="val2017", help="images folder and instances_<split>.json (default: val2017)")
    p.add_argument("--annotations", default=None, help="COCO instances JSON file; --data is then the images folder")
    p.add_argument("--calib-images", default=None, help="image folder that calibrates PTQ (default: held-out images)")
    p.add_argument(
        "--label-map",
        choices=sorted(LABEL_MAPS),
        default=None,
        help="model label -> category id: " + "; ".join(f"{k}: {v}" for k, v in LABEL_MAPS.items()),
    )
    p.add_argument("--image-size", type=int, default=None, help="YOLO letterbox size (default: the model's, 640)")
    p.set_defaults(func=_cmd_eval)
