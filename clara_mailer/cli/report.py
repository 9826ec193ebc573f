"""The report command."""

from __future__ import annotations

import click

from clara_mailer.cli.app import App, main, pass_app


@main.command("report")
@click.argument("campaign")
@click.option("--segment", metavar="SLUG", help="Only this segment's deliveries.")
@click.option(
    "--status",
    type=click.Choice(
        ["sent", "deferred", "failed", "bounced", "unknown", "skipped", "queued", "sending"]
    ),
    help="List the recipients in this state (who did not get it?).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "html"]),
    default="table",
    show_default=True,
    help="table: terminal summary; csv: one row per delivery (Excel-safe, UTF-8 BOM); "
    "json: figures (see README); html: one self-contained page with charts.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file (replaced whole) instead of standard output.",
)
@pass_app
def report_cmd(
    app: App, campaign: str, segment: str | None, status: str | None, fmt: str, output: str | None
) -> None:
    """Report what happened to CAMPAIGN, from its delivery log.

    Totals per status and segment, the most common failure replies, what is due
    for retry, opt-outs, bounces and RSVPs; --status lists the recipients in one
    state with their last SMTP reply.

    \b
    Examples:
      clara-mail report newsletter-2022-01
      clara-mail report newsletter-2022-01 --status failed
      clara-mail report newsletter-2022-01 --format csv -o deliveries.csv
      clara-mail report conference-2022-02-04 --format html -o report.html
    """
    from pathlib import Path

    with app.loading():
        from clara_mailer.cli.report_view import show_report

        db = app.mailer.db
    target = Path(output) if output else None
    show_report(db, campaign, fmt, segment, status, target, app.out)
    if output:
        app.err.print(f"Wrote {output}")
