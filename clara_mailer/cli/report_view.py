"""``clara-mail report`` on the terminal: the rich tables of the summary and of the
``--status`` listing, and the output itself (standard output, or a file replaced whole).

The figures, the JSON document, the CSV rows and the HTML page come from
``clara_mailer.reporting``, which returns data and writes only to the stream it is given.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from clara_mailer.core.errors import InputError
from clara_mailer.core.vocabulary import RsvpAnswer, Status
from clara_mailer.reporting.exports import write_deliveries_csv, write_json
from clara_mailer.reporting.report import (
    TOP_FAILURES,
    CampaignReport,
    build_report,
    check_scope,
    delivery_rows,
    minutes,
    parse_status,
    percent,
)
from clara_mailer.store.database import Database

FORMATS = ("table", "csv", "json", "html")
#: Width of a table summary written to a file (on the terminal: the console's own).
FILE_WIDTH = 120
#: Columns of the ``--status`` listing on the terminal (the CSV has every column).
LISTING_COLUMNS = (
    "email",
    "organisation",
    "segment",
    "attempts",
    "smtp_code",
    "smtp_reply",
    "last_attempt_at",
)

Rows = Iterable[Mapping[str, Any]]


def show_report(
    db: Database,
    campaign: str,
    fmt: str,
    segment: str | None,
    status: str | None,
    output: Path | None,
    out: Console,
) -> None:
    """The report of ``campaign`` in ``fmt`` (table, csv, json, html), written to ``output``
    (which appears only when complete) or, without one, to ``out``.

    Bad input (format, status, campaign, segment) fails before any file is opened; a
    failed write (a full disk, a closed pipe) is an ``InputError`` naming where.
    """
    write = _writer(db, campaign, fmt, segment, status)
    if output is None:
        try:
            write(out)
            out.file.flush()
        except OSError as exc:
            raise InputError(f"cannot write standard output: {exc.strerror or exc}") from exc
        return
    try:
        with _replace_file(Path(output)) as stream:
            write(Console(file=stream, width=FILE_WIDTH, highlight=False))
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc.strerror or exc}") from exc


def _writer(
    db: Database, campaign: str, fmt: str, segment: str | None, status: str | None
) -> Callable[[Console], None]:
    """What writes the report to a console (or its file): every check is done first."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    wanted = parse_status(status) if status is not None else None
    # A generator: no query runs until the output is being written.
    rows = delivery_rows(db, campaign, segment=segment, status=wanted)
    if fmt == "csv":  # needs no figures, only the rows (streamed)
        check_scope(db, campaign, segment)
        return lambda console: write_deliveries_csv(console.file, rows)
    # The terminal summary shows no timeline: its query is left out.
    report = build_report(db, campaign, segment=segment, timeline=fmt != "table")
    listed = rows if wanted is not None else None
    if fmt == "json":
        return lambda console: write_json(console.file, report, listed)
    if fmt == "html":
        from clara_mailer.reporting.html import render_html  # jinja2: only for --format html

        return lambda console: _write_text(console.file, render_html(report, listed))
    return lambda console: print_report(console, report, listed, wanted)


def _write_text(stream: IO[str], text: str) -> None:
    stream.write(text)


@contextmanager
def _replace_file(path: Path) -> Iterator[TextIO]:
    """A text file that appears at ``path`` only when complete (temp file + rename)."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name for --output")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            yield stream
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the terminal summary -----------------------------------------------------------------


def print_report(
    console: Console,
    report: CampaignReport,
    rows: Rows | None = None,
    status: Status | None = None,
) -> None:
    """The terminal report: outcome tables, failures, retries, opt-outs, bounces, RSVPs;
    with ``rows`` (a ``--status`` listing) the recipients in ``status`` instead."""
    scope = f", segment {report.segment_filter}" if report.segment_filter else ""
    ran = f"started {minutes(report.started_at) or 'never'}"
    if report.finished_at:
        ran += f", last run finished {minutes(report.finished_at)}"
    console.print(
        f"[bold]{report.slug}[/bold] ({report.kind}{scope}): {report.total} deliveries, {ran} UTC"
    )
    if rows is not None and status is not None:
        console.print(_listing(rows, status, report.totals[status]))
        return
    console.print(_outcomes(report))
    if report.failures:
        console.print(_failures(report))
    _print_still_to_do(console, report)
    _print_bounces(console, report)
    o = report.optouts
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(o.by_reason.items()))
    note = f" ({reasons})" if reasons else ""
    lifted = f"; {o.lifted} undone" if o.lifted else ""
    console.print(f"Opt-outs from this campaign: {o.active}{note}{lifted}")
    if report.rsvps is not None:
        yes, no = report.rsvps.get(RsvpAnswer.YES, 0), report.rsvps.get(RsvpAnswer.NO, 0)
        answers = yes + no
        console.print(f"RSVPs: {yes} yes, {no} no ({answers} answer{'' if answers == 1 else 's'})")


def _outcomes(report: CampaignReport) -> Table:
    statuses = report.shown_statuses()
    table = Table(title="Outcomes per segment")
    table.add_column("segment")
    for st in statuses:
        table.add_column(st.value, justify="right")
    table.add_column("total", justify="right")
    for seg, counts in sorted(report.segments.items()):
        seg_total = sum(counts.values())
        cells = [
            f"{counts.get(st, 0)} ({percent(counts.get(st, 0), seg_total)})" for st in statuses
        ]
        table.add_row(Text(seg or "(none)"), *cells, str(seg_total))
    table.add_row(
        "[bold]all[/bold]",
        *(f"{report.totals[st]} ({percent(report.totals[st], report.total)})" for st in statuses),
        str(report.total),
    )
    return table


def _failures(report: CampaignReport) -> Table:
    table = Table(title=f"Most common problem replies (top {TOP_FAILURES})")
    for column in ("status", "code", "reply", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for f in report.failures:
        table.add_row(f.status.value, str(f.code or ""), Text(f.reply), str(f.count))
    return table


def _print_still_to_do(console: Console, report: CampaignReport) -> None:
    r = report.retry
    lines = []
    if r.deferred:
        lines.append(
            f"{r.deferred} deferred, {r.due_now} due now; next retry "
            f"{minutes(r.next_attempt_at)}, last {minutes(r.last_attempt_at)} UTC "
            f"(run `clara-mail send {report.slug}`)"
        )
    if r.queued or r.sending:
        lines.append(f"{r.queued} queued and {r.sending} sending: not finished yet")
    if r.unknown:
        lines.append(
            f"{r.unknown} unknown (in flight when a sender stopped): resend with "
            f"`clara-mail send {report.slug} --resend-unknown`"
        )
    if lines:
        console.print("[bold]Still to do[/bold]")
        for line in lines:
            console.print(f"  {line}")


def _print_bounces(console: Console, report: CampaignReport) -> None:
    b = report.bounces
    if b.total:
        table = Table(title=f"Bounces ({b.total})")
        for column in ("kind", "status code", "count"):
            table.add_column(column, justify="right" if column == "count" else "left")
        for kind, code, count in b.codes:
            table.add_row(kind.value, Text(code), str(count))
        console.print(table)
    if b.policy:
        console.print(
            f"[bold red]Warning:[/bold red] {b.policy} policy bounce(s) (5.7.x): receivers "
            "refused the sender (reputation, SPF/DKIM/DMARC), not the recipients; check "
            "the sending domain before going on."
        )


def _listing(rows: Rows, status: Status, expected: int) -> Table:
    table = Table(title=f"{expected} recipient(s) {status.value}")
    for column in LISTING_COLUMNS:
        table.add_column(column.replace("_", " "), overflow="fold")
    for row in rows:
        cells = {**row, "email": row["email"] or "(erased)"}
        table.add_row(
            *(Text("" if cells.get(c) is None else str(cells[c])) for c in LISTING_COLUMNS)
        )
    return table
