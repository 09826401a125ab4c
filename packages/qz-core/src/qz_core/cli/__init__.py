"""The ``qz`` command: argument parsing only; each verb calls one library function (``qz_core.job``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from qz_core import __version__
from qz_core.cli import models, training
from qz_core.cli.arguments import QzArgumentParser
from qz_core.errors import QzError
from qz_core.registry import get_task, list_tasks


def _add_task_commands(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="evaluate FP32 and INT8 models on a validation set")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="TASK")
    for name in list_tasks():
        task = get_task(name)
        task.add_eval_command(tasks.add_parser(name, help=f"{task.metric}, FP32 vs INT8"))
    demos = [name for name in list_tasks() if get_task(name).add_demo_command(QzArgumentParser())]
    # Without its own --help: 'qz demo --task T --help' shows the options of T's demo.
    demo = sub.add_parser(
        "demo", add_help=False, help="FP32 vs INT8 PTQ vs INT8 QAT on a small real dataset that ships offline"
    )
    demo.add_argument("--task", choices=demos, default=demos[0] if demos else None, help="which task's demo")
    demo.set_defaults(func=_run_demo, accepts_extra=True, demo_tasks=demos)


def _run_demo(args: argparse.Namespace) -> int:
    if args.task is None:
        raise QzError("No installed task package has a demo.")
    parser = QzArgumentParser(
        prog=f"qz demo --task {args.task}",
        description=f"The {args.task} demo. Demos of the installed tasks: --task {{{','.join(args.demo_tasks)}}}.",
    )
    get_task(args.task).add_demo_command(parser)
    demo_args = parser.parse_args(args.extra)
    return demo_args.func(demo_args)


def build_parser() -> argparse.ArgumentParser:
    """The ``qz`` argument parser, with the ``eval`` and ``demo`` commands of every installed task."""
    parser = QzArgumentParser(prog="qz", description="INT8 quantization model zoo for PyTorch.")
    parser.add_argument("--version", action="version", version=f"qz {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models.add_commands(sub)
    training.add_command(sub)
    _add_task_commands(sub)
    from qz_core.tools.cli import add_tool_commands

    add_tool_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qz``: bad input exits with status 2 and one line; Ctrl-C with 130."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
        with warnings.catch_warnings():
            quiet_upstream_warnings()
            return args.func(args)
    except QzError as exc:
        print(
            f"qz {getattr(locals().get('args'), 'command', '')}: error: {exc}".replace("qz : ", "qz: "), file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("qz: interrupted", file=sys.stderr)
        return 130


def quiet_upstream_warnings() -> None:
    """Hides the known deprecation notices of eager-mode quantization and TorchScript tracing."""
    for message in (
        ".*torch.ao.quantization.*",
        ".*quantize_per_tensor.*",
        ".*quantize_per_channel.*",
        "Please use quant_min and quant_max.*",
        ".*TypedStorage is deprecated.*",
        ".*legacy TorchScript-based ONNX export.*",
        ".*_check_is_size.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.*")


if __name__ == "__main__":
    raise SystemExit(main())
