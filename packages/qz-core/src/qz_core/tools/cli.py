"""``qz bench`` and ``qz support``: the benchmark suite and the support matrix from the command line.

Parsing and checks only; the work is ``qz_core.tools.bench`` and ``qz_core.tools.support``, imported
when a command runs so that ``qz --help`` stays light. ``qz bench``'s options and command are in
``qz_core.tools.bench.cli``, which shares the selection, output and merge helpers here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from qz_core.backend import supported_backends
from qz_core.errors import QzError, invalid_choice
from qz_core.files import check_output_dir
from qz_core.registry import list_tasks
from qz_core.tools.readme import SUPPORT_BLOCK, check_readme, update_readme_block
from qz_core.tools.support.probe import DEFAULT_ENGINES


def _input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts if p)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"invalid input size {text!r}: use H or HxW, e.g. 224 or 320x320")
    return (size[0], size[-1])


def _at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise QzError(f"--{name.replace('_', '-')} must be at least {minimum}; got {value}.")


def _engines(text: str | None) -> list[str]:
    engines = [e for e in (text or ",".join(DEFAULT_ENGINES)).split(",") if e]
    for engine in engines:
        if engine not in supported_backends():
            raise invalid_choice("engine", engine, supported_backends(), hint="(this PyTorch build's engines)")
    if not engines:
        raise QzError("--engines names no engine; give e.g. x86,qnnpack.")
    return engines


def _check_outputs(args: argparse.Namespace, block: str) -> None:
    """Checks --out and --readme before any work, and --from against a model selection."""
    check_output_dir(args.out, "--out")
    if args.readme:
        check_readme(args.readme, block)
    if args.from_json and (args.models or args.task or args.all_models):
        raise QzError("--from re-renders saved results: pass it without model names, --task or --all.")


def _update_readme(path: str | None, block: str, markdown: str) -> None:
    if path:
        changed = update_readme_block(path, block, markdown)
        print(f"{path}: block {block!r} {'updated' if changed else 'unchanged'}")


def _merge_results(paths: Sequence[str], read: Callable[[str], tuple[list[Any], dict]]) -> tuple[list[Any], dict]:
    """Rows of several saved results (a later file's row replaces an earlier one of the same model).

    Order is kept: a replaced row stays where it first stood.
    """
    rows: dict[str, Any] = {}
    metas = []
    for path in paths:
        found, meta = read(path)
        metas.append(meta | {"source": path})
        rows |= {getattr(r, "model", None) or r.name: r for r in found}
    meta = dict(metas[0]) if len(metas) == 1 else metas[0] | {"merged": metas}
    return list(rows.values()), meta


def _print_written(paths: dict[str, Any]) -> None:
    print("written: " + ", ".join(str(p) for p in paths.values()))


def _publish_support(results: list[Any], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    from qz_core.tools.support import support_markdown, write_support_outputs

    paths = write_support_outputs(results, args.out, meta)
    markdown = support_markdown(results)
    print(markdown)
    _print_written(paths)
    _update_readme(args.readme, SUPPORT_BLOCK, markdown)


def _cmd_support(args: argparse.Namespace) -> int:
    from qz_core.tools.common import machine_info, select_models
    from qz_core.tools.support import read_support_json, run_support

    _check_outputs(args, SUPPORT_BLOCK)
    if args.from_json:
        results, meta = _merge_results(args.from_json, read_support_json)
        _publish_support(results, args, meta)
        return 0
    _at_least(args, 10, "opset")  # QuantizeLinear, which INT8 exports need, came in opset 10
    engines = _engines(args.engines)
    names = select_models(args.models, task=args.task, all_models=args.all_models or not (args.models or args.task))
    results = run_support(names, engines=engines, opset=args.opset, onnx=args.onnx)
    meta = machine_info(1, engines[0]) | {"engines": engines, "opset": args.opset}
    _publish_support(results, args, meta)
    return 0


def _selection(p: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="names or wildcards, e.g. 'resnet*' (see 'qz list')")
    installed = f" (installed: {', '.join(tasks)})" if tasks else ""
    p.add_argument("--task", metavar="TASK", help=f"every model of this task, or filter the names given{installed}")
    p.add_argument("--all", action="store_true", dest="all_models", help="every registered model")


def _outputs(p: argparse.ArgumentParser, out: str, block: str) -> None:
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    p.add_argument("--readme", default=None, metavar="README", help=f"rewrite the {block} block of this markdown file")
    p.add_argument(
        "--from",
        dest="from_json",
        nargs="+",
        metavar="JSON",
        help="re-render the outputs and --readme from saved .json results (merged in order; a later row of a "
        "model replaces an earlier one) without running anything",
    )


def _add_support(sub: argparse._SubParsersAction, tasks: Sequence[str]) -> None:
    p = sub.add_parser(
        "support",
        help="support matrix: PTQ, QAT, INT8 per engine, FP32/INT8 ONNX, float islands (markdown + JSON)",
        description="Runs every step of qz on each model (random weights; every model when none is named) "
        "and tabulates what worked.",
    )
    _selection(p, tasks)
    p.add_argument(
        "--engines", default=None, help=f"comma-separated quantized engines (default: {','.join(DEFAULT_ENGINES)})"
    )
    p.add_argument("--opset", type=int, default=13, help="ONNX opset of the exports (default: 13)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="export and run ONNX")
    _outputs(p, "support-results", SUPPORT_BLOCK)
    p.set_defaults(func=_cmd_support)


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz bench`` and ``qz support`` to the ``qz`` command's subparsers."""
    from qz_core.tools.bench.cli import add_bench_command

    tasks = list_tasks()
    add_bench_command(sub, tasks)
    _add_support(sub, tasks)
    from qz_core.tools.study.cli import add_study_commands

    add_study_commands(sub)
