"""Settings, database, web server, opt-out and bounce commands."""

from __future__ import annotations

import click

from clara_mailer.cli.app import FORMAT_OPTION, App, main, pass_app, print_rows
from clara_mailer.core.errors import MailerError
from clara_mailer.core.vocabulary import OptOutReason, OptOutScope


@main.command("config")
@pass_app
def config_cmd(app: App) -> None:
    """Print the effective settings, with passwords and keys masked.

    Example: CLARA_SMTP_URL=smtp://user:pw@relay.example:587 clara-mail config
    """
    for name, value in app.settings.masked().items():
        if name == "secret_key" and app.settings.secret_key is None:
            value = _stored_secret_key_text(app.settings.database_url)
        click.echo(f"{name} = {value}")


def _stored_secret_key_text(database_url: str) -> str:
    """What `config` says of a secret key not set: read, never generated."""
    from clara_mailer.store.database import secret_key_stored

    try:
        stored = secret_key_stored(database_url)
    except MailerError as exc:
        return f"(not set here; the database cannot be read: {exc})"
    return "(generated, stored in the database)" if stored else "(not set)"


@main.group("db")
def db_group() -> None:
    """Database schema commands: upgrade the schema, copy to another database.

    \b
    Examples:
      clara-mail db upgrade
      clara-mail db copy postgresql+psycopg://clara@db.example/clara
    """


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Upgrade the database schema to the newest migration.

    Example: CLARA_DATABASE_URL=postgresql+psycopg://clara@db.example/clara clara-mail db upgrade
    """
    from clara_mailer.store.database import Database

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
    from clara_mailer.store.copying import check_source_exists, copy_database
    from clara_mailer.store.database import Database

    check_source_exists(source_url or app.settings.database_url)
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


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8025, show_default=True, type=click.IntRange(1, 65535))
@pass_app
def serve_cmd(app: App, host: str, port: int) -> None:
    """Serve the unsubscribe (/u/TOKEN) and RSVP (/r/TOKEN) pages, /subscribe, /archive,
    the dashboard (/admin) and /health; start scheduled sends when they are due.

    Put it behind the HTTPS proxy that answers at CLARA_BASE_URL. Every 30 seconds it
    starts the scheduled sends that are due (`send --at`), each once even when several
    servers (or `clara-mail scheduled run`) share the database.

    Example: clara-mail serve --host 127.0.0.1 --port 8025
    """
    import threading

    import uvicorn

    from clara_mailer.cli.schedule import run_in_background
    from clara_mailer.mailer import Mailer
    from clara_mailer.web.app import create_app, uvicorn_log_config

    stop = threading.Event()
    runner = Mailer(app.settings)  # its own engine: the web app closes its own on shutdown
    scheduler = threading.Thread(
        target=run_in_background, args=(runner, stop), name="clara-schedules", daemon=True
    )
    scheduler.start()
    try:
        # The access log shows only a short prefix of each token (a token is a credential).
        uvicorn.run(
            create_app(app.mailer),
            host=host,
            port=port,
            server_header=False,
            log_config=uvicorn_log_config(),
        )
    finally:
        stop.set()
        scheduler.join(timeout=60)  # a send under way finishes its in-flight messages
        runner.close()


@main.group("optout")
def optout_group() -> None:
    """Add, list or lift opt-outs (suppressions, stored as keyed hashes of the address).

    Example: clara-mail optout add ana@policia-getafe.example --reason "asked by phone"
    """


@optout_group.command("add")
@click.argument("address")
@click.option(
    "--reason",
    default=OptOutReason.MANUAL.value,
    show_default=True,
    help="A reason (manual, complaint, unsubscribe, ...) or free text, kept as a note.",
)
@click.option(
    "--scope",
    type=click.Choice([s.value for s in OptOutScope]),
    default=OptOutScope.ALL.value,
    show_default=True,
)
@pass_app
def optout_add(app: App, address: str, reason: str, scope: str) -> None:
    """Stop sending to ADDRESS (every campaign, or one kind with --scope).

    Example: clara-mail optout add ana@policia-getafe.example --scope newsletter
    """
    known = reason in set(OptOutReason)
    row, new = app.mailer.optout_add(
        address,
        reason=reason if known else OptOutReason.MANUAL,
        scope=scope,
        note="" if known else reason,
    )
    state = "suppressed" if new else "already suppressed"
    click.echo(f"{address}: {state} (scope {row.scope}, hash {row.address_hash[:12]}…)")


@optout_group.command("list")
@FORMAT_OPTION
@pass_app
def optout_list(app: App, fmt: str) -> None:
    """List every suppression: hash, scope, reason, source, when, and when lifted.

    Example: clara-mail optout list --format csv > optouts.csv
    """
    rows = app.mailer.optouts()
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
    if not yes:
        click.confirm(f"Send to {address} again?", abort=True)
    rows = app.mailer.optout_remove(address, note="lifted with clara-mail optout")
    reasons = ", ".join(f"{row.reason} ({row.scope})" for row in rows)
    click.echo(f"{address}: lifted {len(rows)} suppression(s): {reasons}")


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
    Message-ID, else by address. Unsubscribe requests sent to the List-Unsubscribe
    mailto address (Subject unsubscribe-TOKEN) are applied like the one-click link;
    a bad token changes nothing. Reading the same mailbox twice changes nothing.
    IMAP messages are flagged \\Seen and $ClaraProcessed (or moved with --move-to).

    \b
    Examples:
      clara-mail bounces import --mbox /var/mail/bounces --dry-run
      clara-mail bounces import --maildir ~/Maildir/.Bounces
      clara-mail bounces import --imap imaps://bounces:secret@mail.clara.example --move-to Done
    """
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
    report = app.mailer.import_bounces(source, dry_run=dry_run, campaign=campaign)
    prefix = "Dry run, nothing changed: " if dry_run else ""
    click.echo(f"{prefix}{report.source}")
    for name, value in [*report.counts().items(), *report.unsubscribe_counts().items()]:
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
