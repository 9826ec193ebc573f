"""CSV writing that a spreadsheet cannot turn into formulas."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> str:
    """Text for one cell: a leading ``= + - @`` (or tab/CR) is neutralised with a quote."""
    if value is None:
        return ""
    text = str(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def write_csv(
    stream: TextIO, columns: list[str], rows: Iterable[Mapping[str, Any]], *, bom: bool = False
) -> None:
    if bom:
        stream.write("\ufeff")
    writer = csv.writer(stream, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([safe_cell(row.get(c)) for c in columns])
