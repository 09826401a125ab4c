"""``qz train-qat``: quantization-aware training with a schedule, checkpoints and resume, under torchrun too."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from qz_core.backend import supported_backends
from qz_core.cli.arguments import non_negative_int, positive_int
from qz_core.distributed import DEVICES, launch_ranks
from qz_core.errors import QzError
from qz_core.training import QatTrainingConfig, train_qat_model

WORKERS = min(4, os.cpu_count() or 1)
DEFAULTS = QatTrainingConfig(model="", train=Path(), val=Path(), out=Path())
DESCRIPTION = (
    "Quantization-aware training, torchvision's recipe (SGD with momentum and weight decay, StepLR, observers "
    "and BatchNorm statistics frozen after set epochs). After every epoch an INT8 copy is converted and scored "
    "on --val; OUT gets int8_best.pt, int8_last.pt, checkpoint.pt and history.json. Launch with "
    "'torchrun --nproc_per_node N --no-python qz train-qat ...' to train on N processes (DistributedDataParallel)."
)


def float_above(minimum: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above ``minimum`` (or equal to it with ``inclusive``)."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a number {bound}; got {text!r}")
        return value

    parse.__name__ = f"float_{'at_least' if inclusive else 'above'}_{minimum:g}"
    return parse


def _fraction(text: str) -> float:
    value = float_above(0.0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1]; got {text!r}")
    return value


def _config(args: argparse.Namespace) -> QatTrainingConfig:
    model_kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.backend is not None:
        model_kwargs["backend"] = args.backend
    return QatTrainingConfig(
        model=args.model,
        train=Path(args.train),
        val=Path(args.val),
        out=Path(args.out),
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_step=args.lr_step,
        lr_gamma=args.lr_gamma,
        freeze_observers_after=args.freeze_observers_after,
        freeze_bn_after=args.freeze_bn_after,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        image_size=args.image_size,
        resume=args.resume,
        model_kwargs=model_kwargs,
        progress=not args.no_progress,
    )


def _cmd_train_qat(args: argparse.Namespace) -> int:
    main_rank = launch_ranks().main
    warnings.filterwarnings("always", message=".*random weights.*")
    warnings.showwarning = lambda message, *rest: print(f"qz: warning: {message}", file=sys.stderr)
    try:
        result = train_qat_model(_config(args))
    except QzError:
        if not main_rank:
            return 2  # every rank fails alike: rank 0 says why, once
        raise
    if main_rank:
        print(result.summary())
    return 0


def _add_schedule(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--epochs", type=positive_int, required=True, help="total QAT epochs (a resumed run continues)")
    p.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help=f"images per process (default: {d.batch_size})"
    )
    p.add_argument("--lr", type=float_above(0.0), default=d.lr, help=f"SGD learning rate (default: {d.lr:g})")
    p.add_argument(
        "--momentum", type=float_above(0.0, inclusive=True), default=d.momentum, help="SGD momentum (default: 0.9)"
    )
    p.add_argument(
        "--weight-decay",
        type=float_above(0.0, inclusive=True),
        default=d.weight_decay,
        help="SGD weight decay (default: 1e-4)",
    )
    p.add_argument("--lr-step", type=positive_int, default=d.lr_step, help="StepLR period in epochs (default: 30)")
    p.add_argument("--lr-gamma", type=_fraction, default=d.lr_gamma, help="StepLR factor in (0, 1] (default: 0.1)")
    p.add_argument(
        "--freeze-observers-after",
        type=positive_int,
        default=d.freeze_observers_after,
        help=f"observers update in the first N epochs, then keep their ranges (default: {d.freeze_observers_after})",
    )
    p.add_argument(
        "--freeze-bn-after",
        type=non_negative_int,
        default=d.freeze_bn_after,
        help=f"BatchNorm statistics update during the first N epochs, then stay (default: {d.freeze_bn_after})",
    )


def add_command(sub: argparse._SubParsersAction) -> None:
    """Adds ``train-qat``."""
    p = sub.add_parser("train-qat", help="QAT with epochs, schedule, checkpoints and resume (torchrun for DDP)")
    p.description = DESCRIPTION
    p.add_argument("model", help="model name (see 'qz list')")
    p.add_argument("--weights", default=None, help="float weights: enum name (DEFAULT, ...) or checkpoint file")
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="class count of a checkpoint with its own head"
    )
    p.add_argument("--train", required=True, help="labelled training folder, in a layout of the model's task")
    p.add_argument("--val", required=True, help="labelled validation folder, scored after every epoch")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, int8_best.pt, int8_last.pt, history.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt where it stopped")
    _add_schedule(p)
    p.add_argument(
        "--device", choices=DEVICES, default="cpu", help="train fake-quantized on cpu or cuda (convert stays on cpu)"
    )
    p.add_argument(
        "--workers", type=non_negative_int, default=WORKERS, help=f"data loading processes (default: {WORKERS})"
    )
    p.add_argument(
        "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every epoch's random numbers (default: 0)")
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="train and score at this square size (task's transform)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_train_qat)
