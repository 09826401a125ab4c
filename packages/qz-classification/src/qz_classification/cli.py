"""``qz`` subcommands contributed by qz-classification: ``qz demo`` and ``qz eval classification``."""

from __future__ import annotations

import argparse

from qz_core.backend import supported_backends
from qz_core.cli import add_eval_arguments, report_eval, task_subcommands


def _cmd_demo(args: argparse.Namespace) -> int:
    from qz_classification.demo import run_demo

    run_demo(
        args.model,
        weights=args.weights,
        data=args.data,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        image_size=args.image_size,
        calib_batches=args.calib_batches,
        backend=args.backend,
        out_dir=args.out_dir,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from qz_classification.evaluate import evaluate_classifier

    result = evaluate_classifier(
        args.model,
        data=args.data,
        weights=args.weights,
        quantize=args.quantize,
        int8=args.int8,
        calib=args.calib,
        calib_batches=args.calib_batches,
        backend=args.backend,
        activation_observer=args.activation_observer,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.limit,
        class_index=args.class_index,
        num_classes=args.num_classes,
        progress=not args.no_progress,
    )
    return report_eval(result, args.json)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    tasks = task_subcommands(sub, "eval")
    p = tasks.add_parser(
        "classification",
        help="ImageNet top-1/top-5, FP32 vs INT8",
        description="Top-1/top-5 accuracy on an ImageNet-style validation folder (one folder per synset id, "
        "n01440764/..., or per class index), FP32 and INT8 side by side.",
    )
    add_eval_arguments(
        p,
        task="classification",
        weights_help="weights name (DEFAULT, IMAGENET1K_V1, ...) or float checkpoint",
        data_help="validation folder: class folders in DIR or DIR/val",
    )
    p.add_argument("--calib", default=None, help="calibration folder for --quantize ptq (default: held-out data)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--class-index", default=None, help="file mapping folder names to class indices (other labels)")
    p.set_defaults(func=_cmd_eval)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz demo`` and ``qz eval classification`` to the ``qz`` command."""
    p = sub.add_parser("demo", help="FP32 vs INT8 PTQ vs INT8 QAT on bundled real data (or your folder)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--weights", default=None, help="e.g. DEFAULT to fine-tune torchvision's pretrained weights")
    p.add_argument("--data", default=None, help="image folder (train/ and val/, or class subfolders); default: digits")
    p.add_argument("--epochs", type=int, default=3, help="FP32 training epochs")
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64, help="digits upsampled to this size")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--backend", choices=supported_backends(), default=None)
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=_cmd_demo)
    _add_eval(sub)
