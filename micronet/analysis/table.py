"""Plain-text tables for reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

__all__ = ["format_table"]


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if floatfmt is not None:
            return format(value, floatfmt)
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return format(value, ".6g") if abs(value) < 1e6 else format(value, ".0f")
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]],
                 headers: Sequence[str] | None = None, floatfmt: str | None = None) -> str:
    """Format rows as an aligned, pipe-separated (Markdown-compatible) table.

    ``rows`` is a list of dicts (columns: ``headers`` if given, else the keys in order of first
    appearance; a missing key gives an empty cell) or a list of lists (``headers`` optional; without
    them there is no header line). Columns whose non-empty cells are all numbers are right-aligned
    (and marked ``---:`` in the separator line); other columns are left-aligned. Floats are written
    with ``format(x, floatfmt)`` (default: 6 significant digits, no exponent above 10^6);
    ``None`` is an empty cell.
    """
    rows = list(rows)
    if rows and all(isinstance(r, Mapping) for r in rows):
        if headers is None:
            keys: list[str] = []
            for r in rows:
                keys.extend(k for k in r if k not in keys)
            headers = keys
        matrix = [[r.get(h) for h in headers] for r in rows]
    else:
        if any(isinstance(r, Mapping) for r in rows):
            raise TypeError("format_table rows must be all dicts or all lists: convert them to one kind")
        matrix = [list(r) for r in rows]
    ncols = max([len(headers or [])] + [len(r) for r in matrix]) if (matrix or headers) else 0
    matrix = [r + [None] * (ncols - len(r)) for r in matrix]
    head = list(headers) + [""] * (ncols - len(headers)) if headers is not None else None

    numeric = [
        all(_is_number(r[c]) for r in matrix if r[c] is not None) and any(r[c] is not None for r in matrix)
        for c in range(ncols)
    ]
    text = [[_cell(v, floatfmt) for v in r] for r in matrix]
    widths = [max([len(str(head[c])) if head else 0] + [len(r[c]) for r in text] + [3]) for c in range(ncols)]

    def line(cells: Sequence[str]) -> str:
        parts = [cells[c].rjust(widths[c]) if numeric[c] else cells[c].ljust(widths[c]) for c in range(ncols)]
        return "| " + " | ".join(parts) + " |"

    out = []
    if head is not None:
        out.append(line([str(h) for h in head]))
        out.append("|" + "|".join(("-" * (widths[c] + 1) + ":") if numeric[c] else ("-" * (widths[c] + 2))
                                  for c in range(ncols)) + "|")
    out.extend(line(r) for r in text)
    return "\n".join(out)
