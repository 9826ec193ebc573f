"""The ``clara-mail`` command: parse, call one library function, print.

Every ``MailerError`` becomes one line on stderr and its exit code; no traceback.
"""

from __future__ import annotations

import json
import sys
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from clara_mailer import __version__
from clara_mailer.core.errors import MailerError
from clara_mailer.core.settings import Settings, load_settings
from clara_mailer.store.database import Database, open_database

if TYPE_CHECKING:  # the send module is imported only by the commands that send
    from clara_mailer.sending.worker import Plan, SendOptions, SendSummary
    from clara_mailer.sending.worker import Progress as SendProgress


class App:
    """What every command needs, opened lazily: settings, then the database."""

    def __init__(self) -> None:
        self._dbs: list[Database] = []

    @cached_property
    def settings(self) -> Settings:
        return load_settings()

    @cached_property
    def db(self) -> Database:
        database = open_database(self.settings)
        self._dbs.append(database)
        return database

    @cached_property
    def secret_key(self) -> str:
        return self.db.secret_key(self.settings)

    @cached_property
    def out(self) -> Console:
        # Piped output (files, CI, tests) gets wide tables instead of truncated cells.
        width = None if sys.stdout.isatty() else 160
        return Console(highlight=False, soft_wrap=True, width=width)

    @cached_property
    def err(self) -> Console:
        width = None if sys.stderr.isatty() else 160
        return Console(stderr=True, highlight=False, soft_wrap=True, width=width)

    def close(self) -> None:
        for database in self._dbs:
            database.dispose()


pass_app = click.make_pass_decorator(App, ensure=True)


class MailerGroup(click.Group):
    """A group that turns library errors into one clear line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MailerError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def print_rows(
    app: App, rows: list[dict[str, Any]], columns: list[str], fmt: str, title: str | None = None
) -> None:
    """Print rows as a rich table, CSV (spreadsheet-safe) or JSON."""
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2, default=str))
    elif fmt == "csv":
        from clara_mailer.core.csvsafe import write_csv

        write_csv(sys.stdout, columns, rows)
    else:
        table = Table(title=title, show_lines=False)
        for column in columns:
            table.add_column(column.replace("_", " "))
        for row in rows:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
        app.out.print(table)


@click.group(cls=MailerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clara-mail")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Dissemination campaigns and newsletters for the CLARA project.

    \b
    A typical run:
      clara-mail import recipients/*.csv
      clara-mail check newsletter-2022-01
      clara-mail send newsletter-2022-01 --segment local-police
      clara-mail report newsletter-2022-01

    Settings come from clara-mail.toml in the working directory and CLARA_*
    environment variables (see `clara-mail config`).
    """
    app = ctx.ensure_object(App)
    ctx.call_on_close(app.close)


# --- settings and database -------------------------------------------------------------


@main.command("config")
@pass_app
def config_cmd(app: App) -> None:
    """Print the effective settings, with passwords and keys masked.

    Example: CLARA_SMTP_URL=smtp://user:pw@relay.example:587 clara-mail config
    """
    for name, value in app.settings.masked().items():
        click.echo(f"{name} = {value}")


@main.group("db")
def db_group() -> None:
    """Database schema commands."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Upgrade the database schema to the newest migration.

    Example: CLARA_DATABASE_URL=postgresql+psycopg://clara@db.example/clara clara-mail db upgrade
    """
    database = Database(app.settings.database_url)
    try:
        before = database.current_revision()
        database.upgrade()
        click.echo(
            f"{database.safe_url}: schema {before or 'none'} -> {database.current_revision()}"
        )
    finally:
        database.dispose()


@db_group.command("copy")
@click.argument("target_url")
@click.option("--from", "source_url", help="Source database URL (default: CLARA_DATABASE_URL).")
@pass_app
def db_copy(app: App, target_url: str, source_url: str | None) -> None:
    """Copy the whole registry and delivery log into a new database at TARGET_URL.

    The target is created/upgraded and must be empty; ids are kept, so links already
    sent stay valid. The copy is one transaction: all or nothing.

    \b
    Example (move from SQLite to PostgreSQL):
      clara-mail db copy postgresql+psycopg://clara@db.example/clara
    """
    from clara_mailer.store.copying import copy_database

    source = Database(source_url or app.settings.database_url)
    target = Database(target_url)
    try:
        report = copy_database(source, target)
    finally:
        source.dispose()
        target.dispose()
    for table, count in report.rows.items():
        click.echo(f"{table}: {count} row(s)")
    click.echo(f"Copied {report.source} -> {report.target}")


# --- registry commands (registry.py) ---------------------------------------------------


@main.group("recipients")
def recipients_group() -> None:
    """List, show, export or erase recipients.

    Example: clara-mail recipients list --segment local-police --format csv
    """


_FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format (CSV is spreadsheet-safe).",
)


@recipients_group.command("list")
@click.option("--segment", metavar="SLUG", help="Only the members of this segment.")
@_FORMAT_OPTION
@pass_app
def recipients_list(app: App, segment: str | None, fmt: str) -> None:
    """List recipients by address, with their segments.

    Example: clara-mail recipients list --segment local-police --format csv > police.csv
    """
    from clara_mailer.registry.importer import RECIPIENT_COLUMNS, list_recipients

    rows = list_recipients(app.db, segment)
    print_rows(app, rows, RECIPIENT_COLUMNS, fmt, title=f"{len(rows)} recipient(s)")


@recipients_group.command("show")
@click.argument("address")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_app
def recipients_show(app: App, address: str, fmt: str) -> None:
    """Show everything the registry holds about one address.

    Example: clara-mail recipients show comunicacion@policia-elche.example
    """
    from clara_mailer.registry.importer import show_recipient

    data = show_recipient(app.db, address)
    if fmt == "json":
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key.replace('_', ' ')}: {value}")


@main.command("segments")
@_FORMAT_OPTION
@pass_app
def segments_cmd(app: App, fmt: str) -> None:
    """List segments with their member counts.

    Example: clara-mail segments --format json
    """
    from clara_mailer.registry.importer import list_segments

    print_rows(app, list_segments(app.db), ["slug", "name", "members"], fmt, title="Segments")


class _ImportProgress:
    """A rich progress bar (bytes) on a terminal; the summaries in any case."""

    def __init__(self, app: App) -> None:
        from rich.progress import Progress

        self.app = app
        self.bar = Progress(console=app.err, transient=True) if app.err.is_terminal else None
        self.task: Any = None

    def start(self, path: Any, total_bytes: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task(str(path), total=total_bytes)

    def advance(self, position: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=position)

    def finish(self, report: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.task = None
        click.echo(report.summary())
        for reject in report.sample_rejects:
            click.echo(f"  {report.path}:{reject.line}: {reject.reason}", err=True)
        if report.rejected > len(report.sample_rejects):
            more = report.rejected - len(report.sample_rejects)
            click.echo(f"  ... and {more} more rejected row(s)", err=True)


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--segment", metavar="SLUG", help="Segment for rows without a segment column.")
@click.option("--dry-run", is_flag=True, help="Check and count everything; write nothing.")
@click.option("--strict", is_flag=True, help="Import nothing from a file with a rejected row.")
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="FIELD=HEADER",
    help="Read FIELD (email, name, organisation, segment, language, country, "
    "consent_basis, consent_source) from the column HEADER. Repeatable.",
)
@click.option("--create-segments", is_flag=True, help="Create segments the file names.")
@click.option("--update", is_flag=True, help="Refresh name and organisation of known addresses.")
@pass_app
def import_cmd(
    app: App,
    files: tuple[str, ...],
    segment: str | None,
    dry_run: bool,
    strict: bool,
    columns: tuple[str, ...],
    create_segments: bool,
    update: bool,
) -> None:
    """Import recipients from CSV files (comma, semicolon or tab; UTF-8 or Windows-1252).

    Headers are matched in English or Spanish (email/correo, name/nombre,
    organisation/entidad, segment/segmento, language/idioma, country/país,
    consent basis/base jurídica, source/origen). Rejected rows go to
    FILE.rejects.csv beside each input. Exit status: 0 all rows taken, 1 some
    rejected, 2 a file that cannot be read as a table.

    \b
    Examples:
      clara-mail import recipients/*.csv
      clara-mail import contactos.csv --segment associations --column email=Correo-e --dry-run
    """
    from pathlib import Path

    from clara_mailer.core.errors import InputError
    from clara_mailer.registry.importer import ImportOptions, import_files

    mapping: dict[str, str] = {}
    for item in columns:
        name, sep, header = item.partition("=")
        if not sep or not name.strip() or not header.strip():
            raise InputError(f"--column {item}: use FIELD=HEADER, e.g. email=Correo-e")
        mapping[name.strip()] = header.strip()
    options = ImportOptions(
        segment=segment,
        dry_run=dry_run,
        strict=strict,
        columns=mapping,
        create_segments=create_segments,
        update=update,
    )
    paths = [Path(f) for f in files]
    reports = import_files(app.db, app.settings, paths, options, _ImportProgress(app))
    if any(r.rejected for r in reports):
        click.get_current_context().exit(1)


# --- campaign commands (campaigns.py, render.py) ---------------------------------------


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
    from clara_mailer.compose.campaigns import campaign_rows
    from clara_mailer.reporting.report import OVERVIEW_COLUMNS, campaign_overview, merge_overview

    rows = merge_overview(campaign_rows(app.settings), campaign_overview(app.db, app.settings))
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
    from clara_mailer.compose.render import check_campaign
    from clara_mailer.core.errors import CheckFailed

    problems = check_campaign(app.settings, campaign)
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

    from clara_mailer.plan.preview import preview

    if address is not None and (language or segment):
        raise click.UsageError("give --recipient, or --language/--segment, not both")
    data = preview(
        app.settings, app.db, campaign, address=address, language=language,
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


# --- send commands (send.py) -----------------------------------------------------------


@main.command("send")
@click.argument("campaign")
@click.option(
    "--segment",
    "segments",
    multiple=True,
    help="Segment to send to (repeatable; default: the campaign's).",
)
@click.option("--dry-run", is_flag=True, help="Render every message, send nothing, write nothing.")
@click.option(
    "--test-to",
    metavar="ADDRESS",
    help="Send one sample per variant to ADDRESS; the log is untouched.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most N messages in this run.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="SMTP connections.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.01),
    help="At most N messages per second, across all workers.",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Sender processes on this machine, each with --concurrency connections.",
)
@click.option(
    "--resend-unknown",
    is_flag=True,
    help="Resend messages whose outcome is unknown (same Message-ID).",
)
@click.option(
    "--allow-changed-templates", is_flag=True, help="Resume even though the templates changed."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before sending.")
@pass_app
def send_cmd(
    app: App,
    campaign: str,
    segments: tuple[str, ...],
    dry_run: bool,
    test_to: str | None,
    limit: int | None,
    concurrency: int,
    rate: float | None,
    resend_unknown: bool,
    allow_changed_templates: bool,
    yes: bool,
    processes: int,
) -> None:
    """Send CAMPAIGN to its segments, recording every recipient's outcome.

    \b
    Safe to rerun at any time: it resumes where it stopped, retries what is due and
    never sends anyone the same campaign twice. Without CLARA_SMTP_URL, messages are
    written as .eml files under the outbox directory instead.

    \b
    Examples:
      clara-mail send newsletter-2022-01 --segment local-police
      clara-mail send conference-2022-02-04 --test-to me@clara.example
      clara-mail send newsletter-2022-01 --yes --concurrency 8 --rate 20
      clara-mail send newsletter-2022-01 --yes --processes 2   # use both cores
    """
    from clara_mailer.sending.worker import SendOptions, prepare_send, send_test
    from clara_mailer.sending.worker import dry_run as do_dry_run

    options = SendOptions(
        segments=segments,
        limit=limit,
        concurrency=concurrency,
        rate=rate,
        resend_unknown=resend_unknown,
        allow_changed_templates=allow_changed_templates,
    )
    if test_to:
        for language, segment, result in send_test(
            app.db, app.settings, campaign, test_to, segments
        ):
            click.echo(
                f"{language}/{segment}: {result.outcome} {result.code or ''} {result.reply}".rstrip()
            )
        return
    if dry_run:
        report = do_dry_run(app.db, app.settings, campaign, options)
        for segment, count in report.rendered.items():
            click.echo(f"{segment}: {count} message(s) rendered")
        click.echo(f"suppressed: {report.suppressed}; largest message: {report.largest} bytes")
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo("Dry run: nothing was sent and nothing was written.")
        return
    plan = prepare_send(app.db, app.settings, campaign, options)
    _print_plan(app, plan)
    if plan.to_send == 0:
        click.echo("Nothing to send.")
        return
    if not yes:
        click.confirm(f"Send {plan.to_send} message(s)?", abort=True)
    summary = _run_with_progress(app, plan, options, processes)
    _print_summary(app, summary)
    if summary.interrupted:
        app.err.print("Interrupted: in-flight messages were recorded; run send again to go on.")
        raise SystemExit(130)


def _print_plan(app: App, plan: Plan) -> None:
    statuses = ["queued", "deferred", "sent", "failed", "unknown", "skipped", "bounced"]
    table = Table(title=f"{plan.campaign.slug} ({plan.campaign.kind})")
    table.add_column("segment")
    for status in statuses:
        table.add_column(status, justify="right")
    for segment in plan.segments:
        counts = plan.counts.get(segment, {})
        table.add_row(segment, *(str(counts.get(s, 0)) for s in statuses))
    app.out.print(table)
    note = f"planned {plan.added} new, {plan.skipped} skipped (opted out)"
    if plan.requeued_unknown:
        note += f", {plan.requeued_unknown} unknown queued again"
    app.out.print(note)


def _run_with_progress(app: App, plan: Plan, options: SendOptions, processes: int) -> SendSummary:
    import time as _time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from clara_mailer.sending.worker import run_send

    if app.err.is_terminal:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.0f}/s {task.fields[outcomes]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=app.err) as bar:
            task = bar.add_task(plan.campaign.slug, total=plan.to_send, rate=0.0, outcomes="")

            def update(p: SendProgress) -> None:
                outcomes = " ".join(f"{k}={v}" for k, v in sorted(p.counts.items()))
                bar.update(task, completed=p.done, total=p.total, rate=p.rate, outcomes=outcomes)

            return run_send(
                app.db, app.settings, plan, options, progress=update, processes=processes
            )

    last: list[Any] = [0.0, None]

    def plain(p: SendProgress) -> None:
        # Not a terminal: a line every 5 s and one at the end, never the same line twice.
        now = _time.monotonic()
        if (now - last[0] >= 5 or p.done == p.total) and last[1] != (p.done, p.total):
            last[0], last[1] = now, (p.done, p.total)
            outcomes = " ".join(f"{k}={v}" for k, v in sorted(p.counts.items()))
            click.echo(f"{p.done}/{p.total} {p.rate:.0f}/s {outcomes}", err=True)

    return run_send(app.db, app.settings, plan, options, progress=plain, processes=processes)


def _print_summary(app: App, summary: SendSummary) -> None:
    rate = summary.attempted / summary.elapsed if summary.elapsed else 0.0
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing"
    app.out.print(
        f"This run: {outcomes} in {summary.elapsed:.1f}s ({rate:.0f} msg/s) via {summary.transport}"
    )
    if not summary.network:
        app.out.print("Nothing went over the network: messages were written to the outbox.")
    totals = ", ".join(f"{v} {k}" for k, v in sorted(summary.totals.items()))
    app.out.print(f"Campaign {summary.campaign}: {totals}")
    for step in summary.next_steps():
        app.out.print(f"Next: {step}")


# --- opt-out, privacy and web commands (suppressions.py, privacy.py, web.py) -----------


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8025, show_default=True, type=click.IntRange(1, 65535))
@pass_app
def serve_cmd(app: App, host: str, port: int) -> None:
    """Serve the unsubscribe (/u/TOKEN) and RSVP (/r/TOKEN) pages, and /health.

    Put it behind the HTTPS proxy that answers at CLARA_BASE_URL.

    Example: clara-mail serve --host 127.0.0.1 --port 8025
    """
    import uvicorn

    from clara_mailer.web.app import create_app

    uvicorn.run(create_app(app.settings), host=host, port=port, server_header=False)


@main.group("optout")
def optout_group() -> None:
    """Add, list or lift opt-outs (suppressions, stored as keyed hashes of the address).

    Example: clara-mail optout add ana@policia-getafe.example --reason "asked by phone"
    """


@optout_group.command("add")
@click.argument("address")
@click.option(
    "--reason",
    default="manual",
    show_default=True,
    help="A reason (manual, complaint, unsubscribe, ...) or free text, kept as a note.",
)
@click.option(
    "--scope",
    type=click.Choice(["all", "newsletter", "invitation"]),
    default="all",
    show_default=True,
)
@pass_app
def optout_add(app: App, address: str, reason: str, scope: str) -> None:
    """Stop sending to ADDRESS (every campaign, or one kind with --scope).

    Example: clara-mail optout add ana@policia-getafe.example --scope newsletter
    """
    from clara_mailer.core.tokens import TokenSigner
    from clara_mailer.optouts import suppressions

    signer = TokenSigner(app.secret_key)
    with app.db.session() as session:
        known = reason in suppressions.REASONS
        row, new = suppressions.add(
            session,
            signer,
            address,
            reason=reason if known else "manual",
            scope=scope,
            note="" if known else reason,
        )
    state = "suppressed" if new else "already suppressed"
    click.echo(f"{address}: {state} (scope {row.scope}, hash {row.address_hash[:12]}…)")


@optout_group.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@pass_app
def optout_list(app: App, fmt: str) -> None:
    """List every suppression: hash, scope, reason, source, when, and when lifted.

    Example: clara-mail optout list --format csv > optouts.csv
    """
    from clara_mailer.optouts import suppressions

    with app.db.session() as session:
        rows = suppressions.list_suppressions(session)
    columns = ["address_hash", "scope", "reason", "source", "note", "created_at", "lifted_at"]
    print_rows(app, rows, columns, fmt, title="Suppressions")


@optout_group.command("remove")
@click.argument("address")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def optout_remove(app: App, address: str, yes: bool) -> None:
    """Lift the active suppressions of ADDRESS (the rows stay, marked lifted).

    Example: clara-mail optout remove ana@policia-getafe.example --yes
    """
    from clara_mailer.core.tokens import TokenSigner
    from clara_mailer.optouts import suppressions

    if not yes:
        click.confirm(f"Send to {address} again?", abort=True)
    signer = TokenSigner(app.secret_key)
    with app.db.session() as session:
        rows = suppressions.lift(session, signer, address, note="lifted with clara-mail optout")
        reasons = ", ".join(f"{row.reason} ({row.scope})" for row in rows)
    click.echo(f"{address}: lifted {len(rows)} suppression(s): {reasons}")


@recipients_group.command("erase")
@click.argument("address")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def recipients_erase(app: App, address: str, yes: bool) -> None:
    """Erase everything held about ADDRESS (GDPR); keep only a keyed-hash suppression.

    Deletes the profile, segments and RSVPs, and blanks the address in the delivery log.
    A later import refuses the address as opted out.

    Example: clara-mail recipients erase ana@policia-getafe.example --yes
    """
    from clara_mailer.optouts.privacy import erase

    if not yes:
        click.confirm(f"Erase all data about {address}? This cannot be undone", abort=True)
    done = erase(app.db, app.settings, address)
    held = "profile deleted" if done.recipient_found else "no profile held"
    click.echo(
        f"{address}: {held}; {done.segments} segment membership(s), {done.rsvps} RSVP(s) "
        f"removed; address blanked in {done.deliveries} delivery row(s); "
        f"{done.texts_scrubbed} stored text(s) scrubbed; kept a keyed-hash suppression."
    )


@recipients_group.command("export-data")
@click.argument("address")
@pass_app
def recipients_export_data(app: App, address: str) -> None:
    """Print everything held about ADDRESS as JSON (GDPR access request).

    Profile, consent record, segments, deliveries, opt-outs, RSVPs and bounces.

    Example: clara-mail recipients export-data ana@policia-getafe.example > ana.json
    """
    from clara_mailer.optouts.privacy import export_data

    data = export_data(app.db, app.settings, address)
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


# --- report commands (report.py) -------------------------------------------------------


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

    from clara_mailer.reporting.report import ReportOptions, write_report

    options = ReportOptions(fmt, segment, status, Path(output) if output else None)
    write_report(app.db, campaign, options, app.out)
    if output:
        app.err.print(f"Wrote {output}")


# --- bounce commands (bounces.py) ------------------------------------------------------


@main.group("bounces")
def bounces_group() -> None:
    """Read bounces (delivery-status reports) and apply the hard/soft bounce policy.

    Example: clara-mail bounces import --imap imap://bounces:pw@127.0.0.1:1143 --move-to Done
    """


@bounces_group.command("import")
@click.option("--mbox", "mbox_path", type=click.Path(), help="Read an mbox file.")
@click.option("--maildir", "maildir_path", type=click.Path(), help="Read a Maildir folder.")
@click.option("--imap", "imap_url", help="Read imap://user:pass@host:port (or imaps://).")
@click.option("--folder", default="INBOX", show_default=True, help="IMAP folder to read.")
@click.option("--move-to", help="IMAP: move processed bounces to this folder.")
@click.option("--delete", is_flag=True, help="IMAP: delete processed bounces.")
@click.option("--campaign", help="Match bounces by address within this campaign only.")
@click.option("--dry-run", is_flag=True, help="Report what would happen; change nothing.")
@pass_app
def bounces_import(
    app: App,
    mbox_path: str | None,
    maildir_path: str | None,
    imap_url: str | None,
    folder: str,
    move_to: str | None,
    delete: bool,
    campaign: str | None,
    dry_run: bool,
) -> None:
    """Import bounces from a mailbox: mark deliveries bounced, suppress hard bounces.

    Each bounce is matched to its delivery by VERP token, else by the returned
    Message-ID, else by address. Reading the same mailbox twice changes nothing.
    IMAP messages are flagged \\Seen and $ClaraProcessed (or moved with --move-to).

    \b
    Examples:
      clara-mail bounces import --mbox /var/mail/bounces --dry-run
      clara-mail bounces import --maildir ~/Maildir/.Bounces
      clara-mail bounces import --imap imaps://bounces:secret@mail.clara.example --move-to Done
    """
    from clara_mailer.bounces.dsn import import_bounces
    from clara_mailer.bounces.mailboxes import BounceSource

    choices = (("mbox", mbox_path), ("maildir", maildir_path), ("imap", imap_url))
    given = [(kind, where) for kind, where in choices if where]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --mbox, --maildir or --imap")
    if given[0][0] != "imap" and (move_to or delete):
        raise click.UsageError("--move-to and --delete apply to --imap only")
    if move_to and delete:
        raise click.UsageError("give --move-to or --delete, not both")
    source = BounceSource(given[0][0], given[0][1], folder=folder, move_to=move_to, delete=delete)
    report = import_bounces(app.db, app.settings, source, dry_run=dry_run, campaign=campaign)
    prefix = "Dry run, nothing changed: " if dry_run else ""
    click.echo(f"{prefix}{report.source}")
    for name, value in report.counts().items():
        click.echo(f"  {name + ':':<22}{value}")
    for warning in report.warnings:
        click.echo(
            f"Warning: {warning.ref}: policy bounce {warning.status} for {warning.address} "
            f"(the receiver refused the sender, not the address): {warning.diagnostic}"
        )
    for item in report.unmatched:
        click.echo(
            f"Unmatched: {item.ref}: {item.kind} {item.status} for {item.address or '(no address)'}: "
            "no VERP token, Message-ID or delivery to this address"
        )
