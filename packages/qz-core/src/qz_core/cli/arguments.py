"""What every ``qz`` parser shares: one-line errors, and ``type=`` functions that refuse numbers that make no sense.

A bad number stops ``qz`` while it parses, before any model is built or any data read, with one line
such as ``qz eval classification: error: argument --batch-size: must be an integer >= 1; got '0'``
and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class QzArgumentParser(argparse.ArgumentParser):
    """An argument parser (and, through ``add_subparsers``, its subcommands) whose errors are one line, status 2."""

    def error(self, message: str) -> NoReturn:
        """Prints ``PROG: error: MESSAGE`` (no usage block) and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer of ``minimum`` or more; ``why`` tells what the bound is for."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{reason}; got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
onnx_opset = int_at_least(10, "INT8 ONNX needs QuantizeLinear, from opset 10")


def undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """The options, positionals and subcommands of ``parser`` and all its subcommands that have no help text.

    Returns:
        One ``'PROG OPTION'`` entry for each (``-h/--help`` aside), empty when every one is documented.
    """
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._SubParsersAction):
            documented = {choice.dest for choice in action._choices_actions if choice.help}
            missing += [f"{parser.prog} {command}" for command in action.choices if command not in documented]
            for subparser in action.choices.values():
                missing += undocumented_options(subparser)
        elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
            missing.append(f"{parser.prog} {name}")
    return missing
