"""Rendering for people: tables, ages, host-prefixed output."""

from __future__ import annotations

from collections.abc import Sequence

import click

__all__ = ["format_age", "prefix_lines", "render_table"]


def format_age(then_ms: int | None, now_ms: int) -> str:
    """``never``, ``just now``, ``42s ago``, ``3m ago``, ``5h ago``, ``2d ago``."""
    if then_ms is None:
        return "never"
    seconds = (now_ms - then_ms) // 1000
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, separated by two spaces (no trailing blanks)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def prefix_lines(host: str, text: str, *, width: int = 0, err: bool = False) -> None:
    """Echo every line of ``text`` as ``host | line`` (host padded to ``width``)."""
    if not text:
        return
    label = host.ljust(width)
    for line in text.splitlines():
        click.echo(f"{label} | {line}", err=err)
