"""Campaign commands: campaigns, check, preview."""

from __future__ import annotations

import sys

import click

from clara_mailer.cli.app import App, main, pass_app, print_rows


@main.command("campaigns")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
    help="Output format.",
)  # fmt: skip
@pass_app
def campaigns_cmd(app: App, fmt: str) -> None:
    """List the campaigns defined in the templates folder.

    Campaigns with a delivery log also show when they started and finished, how
    many were sent, deferred, failed, bounced, unknown, skipped, and opted out since.

    Example: clara-mail campaigns --format json
    """
    from clara_mailer.reporting.report import OVERVIEW_COLUMNS

    rows = app.mailer.campaigns()
    columns = ["slug", "kind", "languages", "default_segments", "subject", *OVERVIEW_COLUMNS]
    print_rows(app, rows, columns, fmt, title=f"Campaigns in {app.settings.templates_dir}")


@main.command("check")
@click.argument("campaign")
@pass_app
def check_cmd(app: App, campaign: str) -> None:
    """Render every variant of CAMPAIGN and report problems with file and line.

    Checks template errors, unknown variables, missing languages, the unsubscribe
    link, message size (over 100 kB) and subject length (over 78 characters).

    Example: clara-mail check newsletter-2022-01
    """
    from clara_mailer.core.errors import CheckFailed

    problems = app.mailer.check(campaign)
    if problems:
        raise CheckFailed(campaign, problems)
    click.echo(f"{campaign}: OK")


@main.command("preview")
@click.argument("campaign")
@click.option("--recipient", "address", help="Address of a recipient in the registry.")
@click.option("--language", type=click.Choice(["es", "en"]), help="Sample recipient's language.")
@click.option("--segment", help="Sample recipient's segment, e.g. local-police.")
@click.option(
    "--format", "fmt", type=click.Choice(["html", "text", "eml"]), default="html",
    help="The HTML part, the text part, or the whole message.",
)  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False), help="Write here, not stdout.")
@click.option("--open", "open_it", is_flag=True, help="Open the file in a viewer.")
@pass_app
def preview_cmd(
    app: App,
    campaign: str,
    address: str | None,
    language: str | None,
    segment: str | None,
    fmt: str,
    output: str | None,
    open_it: bool,
) -> None:
    """Write what one recipient of CAMPAIGN would receive; nothing is sent.

    Without --recipient, a sample recipient in --language and --segment is used.

    Example: clara-mail preview conference-2022-02-04 --language en --format eml --output inv.eml
    """
    import tempfile
    from pathlib import Path

    if address is not None and (language or segment):
        raise click.UsageError("give --recipient, or --language/--segment, not both")
    data = app.mailer.preview(
        campaign, address=address, language=language,
        segment=segment, fmt=fmt,
    )  # fmt: skip
    if output is None and open_it:
        with tempfile.NamedTemporaryFile(suffix=f".{fmt}", delete=False) as handle:
            output = handle.name
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    Path(output).write_bytes(data)
    click.echo(f"wrote {output} ({len(data)} bytes)", err=True)
    if open_it:
        click.launch(output)
