"""README blocks rewritten from generated markdown.

Tables live between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers and are only ever
written by ``update_readme_block``, never by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from qz_core.errors import QzError
from qz_core.files import write_text_atomic

BENCH_BLOCK = "bench-table"
SUPPORT_BLOCK = "support-table"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, content: str, *, source: str = "the text") -> str:
    """Returns ``text`` with the block between the ``name`` start and end markers set to ``content``.

    Raises:
        QzError: a marker is missing, repeated, or the end comes before the start.
    """
    start, end = _markers(name)
    for marker in (start, end):
        count = text.count(marker)
        if count != 1:
            problem = "is missing from" if count == 0 else f"appears {count} times in"
            raise QzError(f"Marker {marker!r} {problem} {source}; add exactly one {start} ... {end} pair.")
    i, j = text.index(start), text.index(end)
    if j < i:
        raise QzError(f"Marker {end!r} comes before {start!r} in {source}.")
    return text[: i + len(start)] + "\n" + content.strip("\n") + "\n" + text[j:]


def check_readme(path: str | os.PathLike, name: str) -> Path:
    """Checks, before any work, that README ``path`` exists and has one well-formed ``name`` block.

    Raises:
        QzError: the file does not exist, or its markers are missing or broken.
    """
    path = Path(path)
    if not path.is_file():
        raise QzError(f"README file {os.fspath(path)!r} does not exist.")
    replace_block(path.read_text(), name, "", source=os.fspath(path))
    return path


def update_readme_block(path: str | os.PathLike, name: str, content: str) -> bool:
    """Rewrites the ``name`` block of a README file from generated markdown; True if it changed.

    Raises:
        QzError: the file does not exist, or its markers are missing or broken.
    """
    path = check_readme(path, name)
    text = path.read_text()
    new = replace_block(text, name, content, source=os.fspath(path))
    if new != text:
        write_text_atomic(path, new)
    return new != text
