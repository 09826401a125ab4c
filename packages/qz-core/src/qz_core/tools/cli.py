"""``qz bench``, ``qz support``, ``qz study`` and ``qz sensitivity``: the tool commands, apart from the library.

Each command's parser and checks live beside its tool (``tools.bench.cli``, ``tools.support.cli``,
``tools.study.cli``), imported here when ``qz`` builds its parser; the work is imported when a command runs.
"""

from __future__ import annotations

import argparse

from qz_core.registry import list_tasks


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """Adds ``qz bench``, ``qz support``, ``qz study`` and ``qz sensitivity`` to the ``qz`` command's subparsers."""
    from qz_core.tools.bench.cli import add_bench_command
    from qz_core.tools.study.cli import add_study_commands
    from qz_core.tools.support.cli import add_support_command

    tasks = list_tasks()
    add_bench_command(sub, tasks)
    add_support_command(sub, tasks)
    add_study_commands(sub)
