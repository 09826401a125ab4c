"""Errors raised by qz, and the helper that makes them name the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QzError(ValueError):
    """A user-facing error: a bad name, path, file or configuration."""


def closest(value: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Returns up to ``n`` choices closest to ``value`` (for 'did you mean' hints)."""
    return difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)


def invalid_choice(kind: str, value: object, choices: Iterable[str], hint: str = "") -> QzError:
    """Builds an error that names the bad value, suggests near misses and lists the valid choices."""
    choices = sorted(choices)
    message = f"Invalid {kind} {value!r}."
    near = closest(str(value), choices)
    if near:
        message += f" Did you mean {' or '.join(repr(c) for c in near)}?"
    shown = ", ".join(choices[:60]) + (f", ... ({len(choices)} in all)" if len(choices) > 60 else "")
    message += f" Valid {kind}s: {shown}."
    if hint:
        message += f" {hint}"
    return QzError(message)
