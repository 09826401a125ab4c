"""``qz study`` and ``qz sensitivity``: parsing and checks; ``runner``, ``mixed_precision`` and ``render`` work."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qz_core.backend import resolve_backend, supported_backends
from qz_core.cli.arguments import non_negative_int, positive_int
from qz_core.errors import QzError
from qz_core.files import check_output_dir
from qz_core.fusion import FUSE_LEVELS
from qz_core.tools.study.axes import (
    SWEEPS,
    RowConfig,
    default_sweeps,
    make_plan,
    parse_sweep_option,
    read_axes_file,
    stage_names,
)
from qz_core.tools.study.runner import StudyInputs, StudySession, check_jobs, run_study


def _size(text: str) -> tuple[int, int]:
    try:
        size = tuple(int(p) for p in text.lower().replace("x", ",").split(",") if p)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"invalid input size {text!r}: use H or HxW, e.g. 64 or 320x320")
    return (size[0], size[-1])


def _inputs(args: argparse.Namespace, **options: Any) -> StudyInputs:
    kwargs = options | ({} if args.num_classes is None else {"num_classes": args.num_classes})
    return StudyInputs(
        model=args.model,
        weights=args.weights,
        val=Path(args.data),
        calib=Path(args.calib),
        batch_size=args.batch_size,
        workers=args.workers,
        input_size=args.input_size,
        backend=args.backend,
        model_kwargs=kwargs,
        latency_rounds=args.rounds,
    )


def _meta(args: argparse.Namespace, session: StudySession) -> dict[str, Any]:
    from qz_core.tools.common import machine_info

    backend = resolve_backend(args.backend)
    return machine_info(1, backend) | {
        "model": args.model,
        "weights": args.weights or "random",
        "task": session.task.name,
        "val": args.data,
        "calib": args.calib,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "rounds": args.rounds,
    }


def _cmd_study(args: argparse.Namespace) -> int:
    from qz_core.tools.study.render import write_study_outputs

    inputs = _inputs(args)
    inputs.check()
    if args.axes:
        sweeps, base = read_axes_file(args.axes)
    else:
        sweeps, base = (parse_sweep_option(args.sweep) if args.sweep else None), RowConfig()
    out = check_output_dir(args.out, "--out")
    check_jobs(args.jobs)
    session = StudySession(inputs)
    sweeps = default_sweeps(session.float_model) if sweeps is None else sweeps
    plan = make_plan(sweeps, base, stage_names(session.float_model))
    result = run_study(inputs, plan, out, jobs=args.jobs, progress=not args.no_progress, session=session)
    meta = _meta(args, session) | {"jobs": args.jobs, "base": base.to_dict()}
    written = write_study_outputs(result, out, meta)
    print(f"{len(plan.configs())} rows ({result.computed} computed, {result.timed} timed in a sequential pass)")
    print("written: " + ", ".join(str(p) for p in written.values()))
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from qz_core.mixed_precision import Calibration, Scorer, layer_sensitivity
    from qz_core.tools.study.render import write_sensitivity_outputs

    inputs = _inputs(args, fuse_level=args.fuse_level)
    inputs.check()
    out = check_output_dir(args.out, "--out")
    if args.calib_fraction is not None and not 0 < args.calib_fraction <= 1:
        raise QzError(f"--calib-fraction must be in (0, 1]; got {args.calib_fraction}.")
    session = StudySession(inputs)
    model = session.float_model
    calibration = Calibration(session.calib, args.calib_batches, args.calib_fraction)
    scorer = Scorer(session.task, session.val, session.example, session.score_key)
    fp32 = scorer.metric(model)
    results = layer_sensitivity(
        model, calibration, scorer, time_layers=args.latency, progress=not args.no_progress, fp32_metric=fp32
    )
    out.mkdir(parents=True, exist_ok=True)
    written = write_sensitivity_outputs(results, scorer.key, fp32, out, _meta(args, session))
    for rank, r in enumerate(results[:10], 1):
        sqnr = "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f} dB"
        print(f"{rank:3d}. {r.name}: {scorer.key} {r.metric:.2f} (drop {r.drop:+.2f}), SQNR {sqnr}")
    print("written: " + ", ".join(str(p) for p in written.values()))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name (see 'qz list')")
    p.add_argument(
        "--weights", default=None, help="enum weights name (DEFAULT, ...) or checkpoint file; random if left out"
    )
    p.add_argument("--data", required=True, help="labelled validation folder, in a training layout of the model's task")
    p.add_argument("--calib", required=True, help="calibration folder, in a calibration layout of the model's task")
    p.add_argument("--out", required=True, help="output folder (tables, CSVs, plots; the study's row cache)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per batch (default: 32)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loading processes (default: 0)")
    p.add_argument("--input-size", type=_size, default=None, help="H or HxW: the task's default transform at this size")
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="class count of a checkpoint with its own head"
    )
    p.add_argument(
        "--backend", choices=supported_backends(), default=None, help="quantized engine (default: the platform's)"
    )
    p.add_argument(
        "--rounds", type=positive_int, default=20, help="timed calls per row, batch 1, 1 thread (default: 20)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_study_commands(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz study`` and ``qz sensitivity``."""
    p = sub.add_parser(
        "study",
        help="PTQ study: fusion, observers, start stage, calibration fraction; markdown, CSV and plot per sweep",
        description="Quantizes the model once per configuration and reports the task's metric, its loss, size and "
        "batch-1 latency beside FP32. Rows are cached in OUT/rows: an interrupted study resumes.",
    )
    _common(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--sweep",
        default=None,
        help=f"comma-separated sweeps with their default values ({','.join(SWEEPS)}); by default the seed "
        "study's four, and relu6 where the model has a ReLU6",
    )
    group.add_argument("--axes", default=None, help="YAML or JSON file of sweeps and their values (and a 'base')")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="rows scored in parallel processes (default: 1); above 1, latency is measured in a sequential pass after",
    )
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser(
        "sensitivity",
        help="per-layer sensitivity: metric change and output SQNR with only that layer in INT8",
        description="Quantizes each layer alone (the rest float), sorted most sensitive first; table, CSV and plot.",
    )
    _common(p)
    p.add_argument("--fuse-level", choices=FUSE_LEVELS, default="all", help="fusion before the layers are listed")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--calib-batches", type=positive_int, default=None, help="calibrate each layer on this many batches"
    )
    group.add_argument("--calib-fraction", type=float, default=None, help="or on this fraction (0, 1] of the folder")
    p.add_argument(
        "--latency", action=argparse.BooleanOptionalAction, default=True, help="time each layer alone in FP32 and INT8"
    )
    p.set_defaults(func=_cmd_sensitivity)
