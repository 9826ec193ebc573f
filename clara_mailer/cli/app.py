"""What every command shares: the ``Mailer`` (opened lazily), the consoles, the group
that turns library errors into one line and an exit status, and table output."""

from __future__ import annotations

import errno
import gc
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from clara_mailer import __version__
from clara_mailer.core.errors import MailerError

if TYPE_CHECKING:  # imported where used: `--version` and `--help` load no database or rich
    from rich.console import Console

    from clara_mailer.core.settings import Settings
    from clara_mailer.mailer import Mailer


class App:
    """The command's context: settings, then the Mailer, created on first use."""

    #: ``--project DIR``; else CLARA_PROJECT, else clara-mail.toml here or in a parent.
    project: Path | None = None

    @cached_property
    def settings(self) -> Settings:
        from clara_mailer.core.settings import load_settings, project_folder

        if self.project is not None:
            return load_settings(project_folder(self.project, "--project"))
        return load_settings()

    @cached_property
    def mailer(self) -> Mailer:
        from clara_mailer.mailer import Mailer

        return Mailer(self.settings)

    @cached_property
    def out(self) -> Console:
        from rich.console import Console

        # Piped output (files, CI, tests) gets wide tables instead of truncated cells.
        width = None if sys.stdout.isatty() else 160
        return Console(highlight=False, soft_wrap=True, width=width)

    @cached_property
    def err(self) -> Console:
        from rich.console import Console

        width = None if sys.stderr.isatty() else 160
        return Console(stderr=True, highlight=False, soft_wrap=True, width=width)

    #: Whether ``loading`` froze what was loaded (``close`` thaws it).
    _froze = False

    @contextmanager
    def loading(self) -> Iterator[None]:
        """The command loads its modules and opens its database with the cyclic garbage
        collector paused; what was loaded is then frozen (``gc.freeze``) until ``close``.

        Loading SQLAlchemy, the driver, its dialect and rich makes ~100,000 objects the
        collector tracks, and no garbage. Left running, the collector walks them again and
        again as they accumulate: for ``report``, whose run is ~0.4 s and mostly loading,
        ~11% of its CPU time (429 against 382 ms with the collector off, median of 20
        runs). Paused, its first pass after resuming would walk them all (35 ms); frozen,
        they are out of every pass (0.1 ms), and ``send`` is spared full passes over them
        while it sends (46 and 87 ms in one send). ``close`` puts them back under the
        collector, for a process that runs many commands (the tests)."""
        if not gc.isenabled():
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            self._froze = True
            gc.enable()

    def close(self) -> None:
        if "mailer" in self.__dict__:
            self.mailer.close()
        if self._froze:
            gc.unfreeze()
            self._froze = False


pass_app = click.make_pass_decorator(App, ensure=True)


#: Errors without a file name that say the output could not be written (a full disk,
#: a quota, a dead terminal): the output is standard output.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
#: Exit status of a file or output that cannot be written: 2, as for input that cannot be
#: used at all (README): the command did nothing useful and a rerun as is fails the same
#: way. 1 would read as "done, some rows or recipients refused".
OUTPUT_ERROR_EXIT = 2


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush of what could
    not be written fails no more (and prints no second error)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (CliRunner): nothing is flushed at exit
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def os_error_line(exc: OSError) -> str:
    """One line for a file or output the command could not open, read or write."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"cannot write or read {exc.filename}: {reason}"
    if exc.errno in _WRITE_ERRNOS:
        return f"cannot write the output: {reason}"
    return reason


class MailerGroup(click.Group):
    """A group that turns library errors into one clear line and an exit status.

    A file or output that cannot be written (``preview --output missing-dir/x.html``,
    ``recipients list > /dev/full``) is one line and exit 2; a closed pipe (``| head``)
    ends the command quietly, as click does (exit 1, nothing printed).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a full disk shows here, not in the interpreter's last flush
            return result
        except MailerError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            raise  # click's main: no message, and no second error when Python exits
        except OSError as exc:
            if exc.filename is None:
                _discard_stdout()
            click.echo(f"Error: {os_error_line(exc)}", err=True)
            ctx.exit(OUTPUT_ERROR_EXIT)


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
        from rich.table import Table

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
@click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="The project folder (with clara-mail.toml). Default: $CLARA_PROJECT, else the "
    "working directory or the nearest parent with a clara-mail.toml.",
)
@click.pass_context
def main(ctx: click.Context, project: Path | None) -> None:
    """Dissemination campaigns and newsletters for the CLARA project.

    \b
    A typical run:
      clara-mail import recipients/*.csv
      clara-mail check newsletter-2022-01
      clara-mail send newsletter-2022-01 --segment local-police
      clara-mail report newsletter-2022-01

    Settings come from the project's clara-mail.toml (in the working directory
    or a parent; `clara-mail init DIR` makes one) and CLARA_* environment
    variables (see `clara-mail config`).
    """
    app = ctx.ensure_object(App)
    app.project = project
    ctx.call_on_close(app.close)
