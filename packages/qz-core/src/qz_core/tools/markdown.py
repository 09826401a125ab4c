"""Markdown pieces the bench and support tables share: cells, tables, notes under a table."""

from __future__ import annotations

from collections.abc import Sequence


def ms(value: float | None) -> str:
    """A latency in milliseconds with three significant-ish digits; '-' when not measured."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def num(value: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals; '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def yes_no(value: bool | None) -> str:
    """'Y', 'N', or '-' when not tried."""
    return "-" if value is None else "Y" if value else "N"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table (pipes inside cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def notes(title: str, items: Sequence[tuple[str, str]]) -> list[str]:
    """A titled bullet list of (name, text) notes; nothing when there are none."""
    if not items:
        return []
    return ["", title, ""] + [f"- **{name}**: {text.replace(chr(10), ' ')}" for name, text in items]
