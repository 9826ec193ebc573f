"""Dashboard accounts (``users add|list|remove``) and the audit table (``audit``)."""

from __future__ import annotations

import getpass

import click

from clara_mailer.cli.app import FORMAT_OPTION, App, main, pass_app, print_rows


def _operator() -> str:
    """Who ran an account command, as the audit table names them."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "cli"


@main.group("users")
def users_group() -> None:
    """Accounts of the dashboard (/admin on `clara-mail serve`).

    \b
    Examples:
      clara-mail users add maria
      clara-mail users list
      clara-mail users remove maria
    """


@users_group.command("add")
@click.argument("name")
@pass_app
def users_add(app: App, name: str) -> None:
    """Create the account NAME; asks for its password twice (stored as an argon2 hash).

    Example: clara-mail users add maria
    """
    from clara_mailer.accounts.users import check_name, check_password

    check_name(name)
    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    check_password(password)
    app.mailer.add_user(name, password, who=_operator())
    click.echo(f"User {name} added.")


@users_group.command("list")
@FORMAT_OPTION
@pass_app
def users_list(app: App, fmt: str) -> None:
    """List the dashboard's accounts.

    Example: clara-mail users list --format csv
    """
    rows = app.mailer.users()
    if not rows and fmt == "table":
        click.echo("No users: add one with `clara-mail users add NAME`.")
        return
    print_rows(app, rows, ["name", "created_at"], fmt, title="Dashboard users")


@users_group.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def users_remove(app: App, name: str, yes: bool) -> None:
    """Delete the account NAME; its open sessions stop working at once.

    Example: clara-mail users remove maria --yes
    """
    if not yes:
        click.confirm(f"Remove the user {name}?", abort=True)
    app.mailer.remove_user(name, who=_operator())
    click.echo(f"User {name} removed.")


@main.command("audit")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--user", "who", metavar="NAME", help="Only this user's actions.")
@FORMAT_OPTION
@pass_app
def audit_cmd(app: App, limit: int, who: str | None, fmt: str) -> None:
    """List the audit table, newest first: every dashboard login, logout, look-up,
    download and opt-out, and every account change, with who did it and when (UTC).

    Example: clara-mail audit --user maria --limit 20
    """
    rows = app.mailer.audit_log(limit=limit, who=who)
    print_rows(app, rows, ["at", "who", "what", "detail"], fmt, title="Audit (newest first)")
