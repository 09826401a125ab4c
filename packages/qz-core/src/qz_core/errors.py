"""Errors raised by qz, and the helper that makes them name the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QzError(ValueError):
    """A user-facing error: a bad name, path, file or configuration."""


def closest(value: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Returns up to ``n`` choices closest to ``value`` (for 'did you mean' hints)."""
    return difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)


def _plural(kind: str) -> str:
    return kind if kind.endswith("s") else f"{kind}s"


def unreadable_file(what: str, path: object, exc: BaseException) -> QzError:
    """An error for a file that exists but cannot be read: its first error line, without the library's advice."""
    reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")[:160]
    detail = f"{type(exc).__name__}: {reason}" if any(c.isalpha() for c in reason) else type(exc).__name__
    return QzError(f"Cannot read {what} {str(path)!r}: not a PyTorch file ({detail}).")


def invalid_choice(kind: str, value: object, choices: Iterable[str], hint: str = "") -> QzError:
    """Builds an error that names the bad value, suggests near misses and lists the valid choices."""
    choices = sorted(choices)
    message = f"Invalid {kind} {value!r}."
    near = closest(str(value), choices)
    if near:
        message += f" Did you mean {' or '.join(repr(c) for c in near)}?"
    shown = ", ".join(choices[:60]) + (f", ... ({len(choices)} in all)" if len(choices) > 60 else "")
    message += f" Valid {_plural(kind)}: {shown}."
    if hint:
        message += f" {hint}"
    return QzError(message)
