"""Files written whole or not at all, and output paths checked before the work starts."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from qz_core.errors import QzError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` only if the block finishes.

    For writers that take a file name (ONNX, image savers). A failure or a kill leaves the old file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it onto ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        write(file)
        file.flush()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` whole or not at all."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def check_output_path(path: str | os.PathLike, label: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Checks an output file path before any work: not a folder, a writable parent, a known suffix.

    Raises:
        QzError: naming the option and the path.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise QzError(f"{label} {str(target)!r} is a folder; give a file name.")
    if suffixes and target.suffix.lower() not in suffixes:
        raise QzError(f"{label} {str(target)!r} should end in {' or '.join(suffixes)}.")
    parent = target.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise QzError(f"{label} {str(target)!r}: cannot write into {str(existing or parent)!r}.")
    return target


def check_output_dir(path: str | os.PathLike, label: str) -> Path:
    """Checks an output folder before any work: not a file, creatable and writable."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise QzError(f"{label} {str(target)!r} is a file; give a folder.")
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        raise QzError(f"{label} {str(target)!r}: cannot write into {str(existing or target)!r}.")
    return target
