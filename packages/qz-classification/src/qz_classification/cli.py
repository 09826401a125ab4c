"""``qz`` subcommands contributed by qz-classification."""

from __future__ import annotations

import argparse

from qz_core.backend import supported_backends


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


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz demo`` to the ``qz`` command."""
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
