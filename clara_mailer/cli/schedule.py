"""Scheduled sends: ``scheduled run`` (for cron or a systemd timer) and ``scheduled list``;
``send --at`` records one, ``send --cancel-schedule`` cancels it, ``serve`` runs them too."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from typing import TYPE_CHECKING

import click

from clara_mailer.cli.app import FORMAT_OPTION, App, main, pass_app, print_rows
from clara_mailer.core.errors import InputError, MailerError

if TYPE_CHECKING:
    from clara_mailer.mailer import Mailer
    from clara_mailer.plan.plan import SendOptions

#: How often ``clara-mail serve`` looks for due scheduled sends, in seconds.
POLL_SECONDS = 30.0
SCHEDULE_COLUMNS = [
    "id", "campaign", "due_at", "state", "processes", "claimed_by", "finished_at", "result",
]  # fmt: skip

log = logging.getLogger("clara_mailer.schedule")


def parse_at(text: str) -> dt.datetime:
    """``2022-01-20T09:00+01:00`` (ISO 8601 with its UTC offset, or Z) -> an aware time."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"--at {text!r} is not a time: use ISO 8601 with the UTC offset, "
            "e.g. 2022-01-20T09:00+01:00"
        ) from None
    if when.tzinfo is None:
        raise InputError(
            f"--at {text!r} names no UTC offset: add one, e.g. {text}+01:00 or {text}Z"
        )
    return when


def record_schedule(
    app: App, campaign: str, at: str, options: SendOptions, processes: int = 1
) -> None:
    """``send CAMPAIGN --at TIME``: the plan and the time recorded, nothing sent. The
    schedule keeps ``--processes`` too, so the runner sends with as many processes."""
    from clara_mailer.audience.schedule import ScheduledOptions

    kept = ScheduledOptions.of(options, processes)
    row = app.mailer.schedule_send(campaign, kept, parse_at(at))
    click.echo(
        f"{campaign}: scheduled for {row['due_at']} UTC (schedule {row['id']}); "
        "`clara-mail serve` or `clara-mail scheduled run` starts it then. "
        f"Cancel with `clara-mail send {campaign} --cancel-schedule`."
    )


def cancel(app: App, campaign: str) -> None:
    count = app.mailer.cancel_schedule(campaign)
    click.echo(f"{campaign}: {count} scheduled send(s) cancelled")


@main.group("scheduled")
def scheduled_group() -> None:
    """Scheduled sends (recorded with `send CAMPAIGN --at TIME`): list them, run those due.

    \b
    Examples:
      clara-mail send newsletter-2022-01 --segment local-police --at 2022-01-20T09:00+01:00
      clara-mail scheduled list
      clara-mail scheduled run        # from cron or a systemd timer, e.g. every minute
    """


@scheduled_group.command("run")
@pass_app
def scheduled_run(app: App) -> None:
    """Start every scheduled send that is due, each once even with several runners.

    Exit status 1 when a scheduled send failed (its result says why).

    Example (cron, every minute): * * * * * cd /srv/clara && clara-mail scheduled run
    """
    ran = app.mailer.run_schedules()
    if not ran:
        click.echo("No scheduled send is due.")
    for item in ran:
        click.echo(f"{item['campaign']} (schedule {item['id']}): {item['state']}: {item['result']}")
    if any(item["state"] == "failed" for item in ran):
        raise SystemExit(1)


@scheduled_group.command("list")
@FORMAT_OPTION
@pass_app
def scheduled_list(app: App, fmt: str) -> None:
    """List scheduled sends (times in UTC): due, running, done, failed or cancelled.

    A send whose runner stopped (killed, crashed, the machine restarted) shows as failed,
    its result saying so; `clara-mail send CAMPAIGN` resumes it.

    Example: clara-mail scheduled list --format json
    """
    rows = app.mailer.schedules()  # a send whose runner died shows as failed, saying why
    for row in rows:
        row["processes"] = json.loads(row["options"] or "{}").get("processes", 1)
    print_rows(app, rows, SCHEDULE_COLUMNS, fmt, title="Scheduled sends")


def run_in_background(
    mailer: Mailer, stop: threading.Event, interval: float = POLL_SECONDS
) -> None:
    """``serve``'s background task: run the due scheduled sends now and every ``interval``
    seconds until ``stop`` is set. A failure is logged; the loop goes on."""
    while True:
        try:
            for item in mailer.run_schedules():
                log.warning(
                    "scheduled send %s (schedule %s): %s: %s",
                    item["campaign"],
                    item["id"],
                    item["state"],
                    item["result"],
                )
        except MailerError as exc:
            log.error("scheduled sends: %s", exc)
        except Exception:
            log.exception("scheduled sends: unexpected error")
        if stop.wait(interval):
            return
