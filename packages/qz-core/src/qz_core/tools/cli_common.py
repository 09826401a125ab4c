"""What the tool commands (``qz bench``, ``qz support``, ``qz study``) parse and check the same way."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from qz_core.errors import QzError
from qz_core.files import check_output_dir
from qz_core.tools.readme import check_readme, update_readme_block


def input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts if p)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"invalid input size {text!r}: use H or HxW, e.g. 224 or 320x320")
    return (size[0], size[-1])


def at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise QzError(f"--{name.replace('_', '-')} must be at least {minimum}; got {value}.")


def check_outputs(args: argparse.Namespace, block: str) -> None:
    """Checks --out and --readme before any work, and --from against a model selection."""
    check_output_dir(args.out, "--out")
    if args.readme:
        check_readme(args.readme, block)
    if args.from_json and (args.models or args.task or args.all_models):
        raise QzError("--from re-renders saved results: pass it without model names, --task or --all.")


def update_readme(path: str | None, block: str, markdown: str) -> None:
    if path:
        changed = update_readme_block(path, block, markdown)
        print(f"{path}: block {block!r} {'updated' if changed else 'unchanged'}")


def merge_results(paths: Sequence[str], read: Callable[[str], tuple[list[Any], dict]]) -> tuple[list[Any], dict]:
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


def print_written(paths: dict[str, Any]) -> None:
    print("written: " + ", ".join(str(p) for p in paths.values()))


def selection(p: argparse.ArgumentParser, tasks: Sequence[str]) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="names or wildcards, e.g. 'resnet*' (see 'qz list')")
    installed = f" (installed: {', '.join(tasks)})" if tasks else ""
    p.add_argument("--task", metavar="TASK", help=f"every model of this task, or filter the names given{installed}")
    p.add_argument("--all", action="store_true", dest="all_models", help="every registered model")


def outputs(p: argparse.ArgumentParser, out: str, block: str) -> None:
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
