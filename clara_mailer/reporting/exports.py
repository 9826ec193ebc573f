"""The report as files: the JSON document and the CSV export, written to a text stream the
caller opens (standard output, a temporary file, an HTTP response). The CSV streams: one
delivery row at a time, whatever the size of the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import IO, Any, TextIO, cast

from clara_mailer.core.csvsafe import write_csv
from clara_mailer.reporting.report import DELIVERY_COLUMNS, CampaignReport


def json_document(
    report: CampaignReport, rows: Iterable[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The ``--format json`` document: the figures and, given ``rows`` (a ``--status``
    listing), the ``recipients`` too."""
    data = report.as_json()
    if rows is not None:
        data["recipients"] = [dict(row) for row in rows]
    return data


def write_json(
    stream: IO[str], report: CampaignReport, rows: Iterable[Mapping[str, Any]] | None = None
) -> None:
    """``json_document`` as indented UTF-8 text (not ASCII-escaped), one final newline."""
    json.dump(json_document(report, rows), stream, ensure_ascii=False, indent=2)
    stream.write("\n")


def write_deliveries_csv(stream: IO[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """One CSV row per delivery (``DELIVERY_COLUMNS``), streamed from ``rows``: a UTF-8
    BOM first so Excel reads the accents right, formula-like cells neutralised. Open a
    file for it with ``newline=""``."""
    # write_csv asks for a TextIO but only ever calls write(): any text stream will do.
    write_csv(cast(TextIO, stream), DELIVERY_COLUMNS, rows, bom=True)
