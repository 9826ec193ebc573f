"""What every command shares: the ``Mailer`` (opened lazily), the consoles, the group
that turns library errors into one line and an exit status, and table output."""

from __future__ import annotations

import json
import sys
from functools import cached_property
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from clara_mailer import __version__
from clara_mailer.core.errors import MailerError
from clara_mailer.core.settings import Settings, load_settings
from clara_mailer.mailer import Mailer


class App:
    """The command's context: settings, then the Mailer, created on first use."""

    @cached_property
    def settings(self) -> Settings:
        return load_settings()

    @cached_property
    def mailer(self) -> Mailer:
        return Mailer(self.settings)

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
        if "mailer" in self.__dict__:
            self.mailer.close()


pass_app = click.make_pass_decorator(App, ensure=True)


class MailerGroup(click.Group):
    """A group that turns library errors into one clear line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MailerError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format: a table, CSV (spreadsheet-safe, UTF-8) or JSON.",
)


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
            if column == "slug":  # what users type: never truncated nor wrapped
                width = max((len(str(row.get(column) or "")) for row in rows), default=4)
                table.add_column("slug", no_wrap=True, overflow="fold", min_width=width)
            else:
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
