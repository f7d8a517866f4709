"""Rows of results printed as an aligned table, JSON, CSV or markdown (profile, ablate, demo, bench)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "json", "csv", "markdown")


def _cell(value: Any, digits: int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits is not None else f"{value:g}"
    return str(value)


def format_rows(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    fmt: str = "table",
    digits: dict[str, int] | None = None,
) -> str:
    """Render ``rows`` (dicts) in ``fmt``; ``digits`` fixes decimals per column for text formats."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    columns = list(columns or (rows[0].keys() if rows else []))
    digits = digits or {}
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2)
    text = [[_cell(r.get(c), digits.get(c)) for c in columns] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(text)
        return buf.getvalue().rstrip("\n")
    widths = [max(len(c), *(len(t[i]) for t in text)) if text else len(c) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r.get(c)) for r in rows) and bool(rows) for c in columns]

    def line(cells: Sequence[str]) -> str:
        parts = [s.rjust(w) if num else s.ljust(w) for s, w, num in zip(cells, widths, numeric, strict=True)]
        return ("| " + " | ".join(parts) + " |") if fmt == "markdown" else "  ".join(parts).rstrip()

    out = [line(columns)]
    if fmt == "markdown":
        rules = [("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)]
        out.append("|" + "|".join(rules) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(t) for t in text]
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
