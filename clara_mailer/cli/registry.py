"""Registry commands: import, segments, recipients (list, show, erase, export-data)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from clara_mailer.cli.app import FORMAT_OPTION, App, main, pass_app, print_rows

if TYPE_CHECKING:  # the importer is loaded by the import command only
    from clara_mailer.registry.importer import ImportReport


@main.group("recipients")
def recipients_group() -> None:
    """List, show, export or erase recipients.

    Example: clara-mail recipients list --segment local-police --format csv
    """


@recipients_group.command("list")
@click.option("--segment", metavar="SLUG", help="Only the members of this segment.")
@FORMAT_OPTION
@pass_app
def recipients_list(app: App, segment: str | None, fmt: str) -> None:
    """List recipients by address, with their segments.

    Example: clara-mail recipients list --segment local-police --format csv > police.csv
    """
    from clara_mailer.registry.recipients import RECIPIENT_COLUMNS

    rows = app.mailer.recipients(segment)
    print_rows(app, rows, RECIPIENT_COLUMNS, fmt, title=f"{len(rows)} recipient(s)")


@recipients_group.command("show")
@click.argument("address")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Output format: readable text or JSON.",
)  # fmt: skip
@pass_app
def recipients_show(app: App, address: str, fmt: str) -> None:
    """Show everything the registry holds about one address.

    Example: clara-mail recipients show comunicacion@policia-elche.example
    """
    data = app.mailer.recipient(address)
    if fmt == "json":
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key.replace('_', ' ')}: {value}")


@main.group("segments", invoke_without_command=True)
@FORMAT_OPTION
@pass_app
@click.pass_context
def segments_cmd(ctx: click.Context, app: App, fmt: str) -> None:
    """List segments with their member counts; create, rename or delete one.

    \b
    Examples:
      clara-mail segments --format json
      clara-mail segments create press-offices --name "Press offices"
    """
    if ctx.invoked_subcommand is None:
        print_rows(app, app.mailer.segments(), ["slug", "name", "members"], fmt, title="Segments")


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
        click.echo(import_summary(report))
        for reject in report.sample_rejects:
            click.echo(f"  {report.path}:{reject.line}: {reject.reason}", err=True)
        if report.rejected > len(report.sample_rejects):
            more = report.rejected - len(report.sample_rejects)
            click.echo(f"  ... and {more} more rejected row(s)", err=True)


def import_summary(report: ImportReport) -> str:
    """One line per file: what was read and what was done with it."""
    if report.skipped:
        return f"{report.path}: skipped ({report.skipped})"
    counts = (
        f"{report.read} rows ({report.encoding}, {report.delimiter}-separated): "
        f"{report.added} added, {report.updated} updated, "
        f"{report.gained_segment} gained a segment, {report.unchanged} unchanged, "
        f"{report.duplicates} duplicate(s), {report.rejected} rejected"
    )
    if report.dry_run:
        text = f"{report.path}: {counts}; dry run: nothing written"
    elif not report.committed:
        # --strict refused the file: the counts are what would have happened.
        text = (
            f"{report.path}: nothing imported: --strict and {report.rejected} row(s) "
            f"rejected; had they been fixed: {counts}"
        )
    else:
        text = f"{report.path}: {counts}"
    if report.created_segments and report.committed:
        text += f"; created segment(s) {', '.join(report.created_segments)}"
    if report.rejects_path is not None:
        text += f"; rejected rows written to {report.rejects_path}"
    return text


@main.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--segment", metavar="SLUG", help="Segment for rows without a segment column.")
@click.option("--dry-run", is_flag=True, help="Check and count everything; write nothing.")
@click.option("--strict", is_flag=True, help="Import nothing from a file with a rejected row.")
@click.option(
    "--rejects",
    "rejects",
    type=click.Path(),
    help="Write rejected rows here: a folder (NAME.rejects.csv in it) or, for one input, a "
    "file. Default: NAME.rejects.csv in the working directory.",
)
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
    rejects: str | None,
    columns: tuple[str, ...],
    create_segments: bool,
    update: bool,
) -> None:
    """Import recipients from CSV files (comma, semicolon or tab; UTF-8 or Windows-1252).

    Headers are matched in English or Spanish (email/correo, name/nombre,
    organisation/entidad, segment/segmento, language/idioma, country/país,
    consent basis/base jurídica, source/origen). Rejected rows go to
    NAME.rejects.csv in the working directory (or --rejects PATH), with the line and
    the reason. Exit status: 0 all rows taken, 1 some
    rejected, 2 a file that cannot be read as a table (the others are still
    imported, each file in its own transaction).

    \b
    Examples:
      clara-mail import recipients/*.csv
      clara-mail import contactos.csv --segment associations --column email=Correo-e --dry-run
    """
    from pathlib import Path

    from clara_mailer.core.errors import InputError
    from clara_mailer.registry.importer import ImportOptions

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
        rejects=Path(rejects) if rejects else Path.cwd(),
    )
    paths = [Path(f) for f in files]
    try:
        reports = app.mailer.import_files(paths, options, _ImportProgress(app))
    except InputError as exc:
        # The other files were imported (and reported); one line per unreadable file.
        for line in str(exc).splitlines():
            click.echo(f"Error: {line}", err=True)
        click.get_current_context().exit(exc.exit_code)
    if any(r.rejected for r in reports):
        click.get_current_context().exit(1)


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
    if not yes:
        click.confirm(f"Erase all data about {address}? This cannot be undone", abort=True)
    done = app.mailer.erase(address)
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
    data = app.mailer.export_data(address)
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))
