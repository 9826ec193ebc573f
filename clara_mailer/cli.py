"""The ``clara-mail`` command: parse, call one library function, print.

Every ``MailerError`` becomes one line on stderr and its exit code; no traceback.
"""

from __future__ import annotations

import json
import sys
from functools import cached_property
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import Settings, load_settings
from .db import Database, open_database
from .errors import MailerError


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
        return Console(highlight=False, soft_wrap=True)

    @cached_property
    def err(self) -> Console:
        return Console(stderr=True, highlight=False, soft_wrap=True)

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
        from .csvsafe import write_csv

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


# --- registry commands (registry.py) ---------------------------------------------------


# --- campaign commands (campaigns.py, render.py) ---------------------------------------


# --- send commands (send.py) -----------------------------------------------------------


# --- opt-out, privacy and web commands (suppressions.py, privacy.py, web.py) -----------


# --- report commands (report.py) -------------------------------------------------------


# --- bounce commands (bounces.py) ------------------------------------------------------
