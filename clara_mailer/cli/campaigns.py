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

    A send recorded with `send --at` shows its time (UTC) under "scheduled".
    Campaigns with a delivery log also show when they started and finished, how
    many were sent, deferred, failed, bounced, unknown, skipped, and opted out since.

    Example: clara-mail campaigns --format json
    """
    from clara_mailer.reporting.report import OVERVIEW_COLUMNS

    rows = app.mailer.campaigns()
    scheduled: dict[str, list[str]] = {}
    for item in app.mailer.schedules(active_only=True):  # `send --at`, not started or running
        when = f"{item['due_at']} UTC" + (" (running)" if item["state"] == "running" else "")
        scheduled.setdefault(item["campaign"], []).append(when)
    for row in rows:
        row["scheduled"] = "; ".join(scheduled.get(row["slug"], [])) or None
    columns = [
        "slug", "kind", "languages", "default_segments", "subject", "scheduled",
        *OVERVIEW_COLUMNS,
    ]  # fmt: skip
    print_rows(app, rows, columns, fmt, title=f"Campaigns in {app.settings.templates_dir}")


@main.command("check")
@click.argument("campaign")
@pass_app
def check_cmd(app: App, campaign: str) -> None:
    """Render every variant of CAMPAIGN and report problems with file and line.

    Checks template errors, unknown variables, missing languages, the unsubscribe
    link, message size (over 100 kB) and subject length (over 78 characters).
    Warns (on stderr, exit status 0) of an invitation whose venue is not set or whose
    event is past, and of each empty legal-footer setting (SMTP sends need them all).

    Example: clara-mail check newsletter-2022-01
    """
    from clara_mailer.core.errors import CampaignError, CheckFailed

    problems = app.mailer.check(campaign)
    try:
        warnings = app.mailer.warnings(campaign)
    except CampaignError:  # a definition that does not load: the problems say why
        warnings = []
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)
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
@click.option(
    "--serve", is_flag=True,
    help="Serve a live preview on 127.0.0.1 that reloads when a file of the campaign changes.",
)  # fmt: skip
@click.option("--port", default=8026, show_default=True, type=click.IntRange(0, 65535))
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
    serve: bool,
    port: int,
) -> None:
    """Write what one recipient of CAMPAIGN would receive; nothing is sent.

    Without --recipient, a sample recipient in --language and --segment is used.
    With --serve, show it in the browser while you write: HTML (desktop and phone
    width), text part and headers, per language and segment, reloaded at each save,
    with check's problems in place of the message when there are any.

    \b
    Examples:
      clara-mail preview conference-2022-02-04 --language en --format eml --output inv.eml
      clara-mail preview spring-2022 --serve
    """
    import tempfile
    from pathlib import Path

    if serve:
        import uvicorn

        from clara_mailer.web.preview import create_preview_app

        url = f"http://127.0.0.1:{port}/"
        click.echo(f"Live preview of {campaign} at {url} (Ctrl-C to stop)", err=True)
        if open_it:
            click.launch(url)
        preview_app = create_preview_app(app.mailer, campaign)
        uvicorn.run(preview_app, host="127.0.0.1", port=port, log_level="warning")
        return
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
