"""Scheduled sends (issue 16): `send --at` records the plan and the time, `campaigns`
shows it, `send --cancel-schedule` cancels it, a time in the past is refused, and the
runners (`scheduled run`, `serve`) start each due send once, even two at once on one
PostgreSQL database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select, update

from clara_mailer.audience.schedule import claim
from clara_mailer.cli.schedule import run_in_background
from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery, Schedule, utcnow
from tests.send_helpers import add_recipients
from tests.smtp_server import RecordingSMTPServer

Cli = Callable[..., Result]
CAMPAIGN = "newsletter-2022-01"


def later(hours: float = 2) -> str:
    return (
        (dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours))
        .astimezone(dt.timezone(dt.timedelta(hours=1)))
        .isoformat(timespec="minutes")
    )


def make_due(db: Database) -> None:
    """Move every due schedule's time to a second ago (as if its time had come)."""
    with db.session() as s:
        s.execute(
            update(Schedule)
            .where(Schedule.state == "due")
            .values(due_at=utcnow() - dt.timedelta(seconds=1))
        )


def schedules(db: Database) -> list[Schedule]:
    with db.session() as s:
        return list(s.scalars(select(Schedule).order_by(Schedule.id)))


def outbox_files(settings: Settings) -> list[Path]:
    folder = settings.outbox_dir / CAMPAIGN
    return sorted(folder.glob("*.eml")) if folder.is_dir() else []


def test_send_at_records_the_plan_and_campaigns_shows_it(
    cli: Cli, db: Database, settings: Settings
) -> None:
    add_recipients(db, 5, "local-police")
    at = later()
    result = cli(
        "send", CAMPAIGN, "--segment", "local-police", "--where", "language=es",
        "--rate", "5", "--at", at,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "scheduled for" in result.output and "--cancel-schedule" in result.output
    (row,) = schedules(db)
    assert row.campaign == CAMPAIGN and row.state == "due" and row.claimed_by is None
    expected = dt.datetime.fromisoformat(at).astimezone(dt.UTC).replace(tzinfo=None)
    assert row.due_at == expected
    options = json.loads(row.options)
    assert options["segments"] == ["local-police"]
    assert options["where"] == ["language=es"] and options["rate"] == 5
    # Nothing sent, nothing planned yet.
    assert outbox_files(settings) == []
    with db.session() as s:
        assert s.scalars(select(Delivery)).first() is None

    shown = json.loads(cli("campaigns", "--format", "json").output)
    by_slug = {r["slug"]: r for r in shown}
    assert by_slug[CAMPAIGN]["scheduled"] == f"{expected:%Y-%m-%d %H:%M:%S} UTC"
    assert by_slug["conference-2022-02-04"]["scheduled"] is None
    listed = cli("scheduled", "list", "--format", "json")
    assert json.loads(listed.output)[0]["state"] == "due"

    # A second schedule of the same campaign is refused while one waits.
    again = cli("send", CAMPAIGN, "--at", later(3))
    assert again.exit_code == 2 and "scheduled already" in again.output


def test_a_time_in_the_past_or_without_offset_is_refused(cli: Cli, db: Database) -> None:
    past = cli("send", CAMPAIGN, "--at", "2022-01-20T09:00+01:00")
    assert past.exit_code == 2
    assert past.output.count("\n") == 1 and "is in the past" in past.output
    naive = cli("send", CAMPAIGN, "--at", "2099-01-20T09:00")
    assert naive.exit_code == 2 and "names no UTC offset" in naive.output
    garbage = cli("send", CAMPAIGN, "--at", "next tuesday")
    assert garbage.exit_code == 2 and "is not a time" in garbage.output
    unknown = cli("send", "no-such-campaign", "--at", later())
    assert unknown.exit_code != 0
    assert schedules(db) == []


def test_cancel_schedule(cli: Cli, db: Database, settings: Settings) -> None:
    add_recipients(db, 3, "local-police")
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--at", later()).exit_code == 0
    cancelled = cli("send", CAMPAIGN, "--cancel-schedule")
    assert cancelled.exit_code == 0 and "1 scheduled send(s) cancelled" in cancelled.output
    (row,) = schedules(db)
    assert row.state == "cancelled" and row.finished_at is not None
    nothing = cli("send", CAMPAIGN, "--cancel-schedule")
    assert nothing.exit_code != 0 and "no scheduled send waiting" in nothing.output
    make_due(db)
    ran = cli("scheduled", "run")
    assert ran.exit_code == 0 and "No scheduled send is due" in ran.output
    assert outbox_files(settings) == []
    # Once cancelled, the campaign may be scheduled again.
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--at", later()).exit_code == 0
    both = cli("send", CAMPAIGN, "--at", later(), "--cancel-schedule")
    assert both.exit_code == 2


def test_scheduled_run_starts_a_due_send_once(cli: Cli, db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 6, "local-police")
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--at", later()).exit_code == 0
    early = cli("scheduled", "run")  # not due yet: nothing happens
    assert "No scheduled send is due" in early.output
    assert outbox_files(settings) == []

    make_due(db)
    ran = cli("scheduled", "run")
    assert ran.exit_code == 0, ran.output
    assert f"{CAMPAIGN} (schedule 1): done: this run: 6 sent" in ran.output
    assert len(outbox_files(settings)) == len(addresses)
    (row,) = schedules(db)
    assert row.state == "done" and row.claimed_by and row.started_at and row.finished_at
    again = cli("scheduled", "run")
    assert "No scheduled send is due" in again.output
    assert len(outbox_files(settings)) == len(addresses)
    shown = json.loads(cli("campaigns", "--format", "json").output)
    assert {r["slug"]: r for r in shown}[CAMPAIGN]["scheduled"] is None
    assert {r["slug"]: r for r in shown}[CAMPAIGN]["sent"] == len(addresses)


def test_a_failing_scheduled_send_is_recorded_and_exits_1(cli: Cli, db: Database) -> None:
    add_recipients(db, 2, "local-police")
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--at", later()).exit_code == 0
    with db.session() as s:  # the segment is gone by the time the send is due
        s.execute(update(Schedule).values(options=json.dumps({"segments": ["gone"]})))
    make_due(db)
    ran = cli("scheduled", "run")
    assert ran.exit_code == 1 and "failed" in ran.output and "gone" in ran.output
    (row,) = schedules(db)
    assert row.state == "failed" and "gone" in row.result


def test_only_one_of_many_claims_wins(db: Database, settings: Settings) -> None:
    mailer = Mailer(settings, database=db)
    row = mailer.schedule_send(
        CAMPAIGN,
        SendOptions(segments=("local-police",)),
        dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    barrier = threading.Barrier(8)
    won: list[str] = []

    def contend(name: str) -> None:
        barrier.wait()
        if claim(db, row["id"], name):
            won.append(name)

    threads = [threading.Thread(target=contend, args=(f"runner-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    (stored,) = schedules(db)
    assert stored.state == "running" and stored.claimed_by == won[0]


def test_the_serve_background_task_runs_due_sends(db: Database, settings: Settings) -> None:
    add_recipients(db, 3, "local-police")
    mailer = Mailer(settings, database=db)
    mailer.schedule_send(
        CAMPAIGN,
        SendOptions(segments=("local-police",)),
        dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    make_due(db)
    stop = threading.Event()
    task = threading.Thread(target=run_in_background, args=(mailer, stop, 0.05))
    task.start()
    try:
        deadline = dt.datetime.now() + dt.timedelta(seconds=30)
        while schedules(db)[0].state != "done":
            assert dt.datetime.now() < deadline, "the background task did not run the send"
            stop.wait(0.05)
    finally:
        stop.set()
        task.join(timeout=30)
    assert not task.is_alive()
    assert len(outbox_files(settings)) == 3


def test_two_schedulers_on_one_postgresql_database_start_the_send_once(
    database_url: str, settings: Settings, db: Database
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only (CLARA_TEST_POSTGRES_URL)")
    total = 200
    addresses = add_recipients(db, total, "local-police")
    with RecordingSMTPServer() as server:
        smtp = dataclasses.replace(settings, smtp_url=server.url(), retry_in_run="")
        Mailer(smtp, database=db).schedule_send(
            CAMPAIGN,
            SendOptions(segments=("local-police",), concurrency=4),
            dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        )
        make_due(db)
        barrier = threading.Barrier(2)
        results: dict[str, list[dict[str, Any]]] = {}
        errors: list[BaseException] = []

        def scheduler(name: str) -> None:
            # Each its own Mailer and engine, as two servers would have.
            with Mailer(smtp) as mailer:
                try:
                    barrier.wait()
                    results[name] = mailer.run_schedules(name)
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=scheduler, args=(n,)) for n in ("server-a", "server-b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        received = Counter(r for m in server.messages for r in m.recipients)

    assert sorted(len(r) for r in results.values()) == [0, 1]  # one runner started it
    winner = next(name for name, ran in results.items() if ran)
    assert results[winner][0]["state"] == "done"
    assert set(received) == set(addresses)
    assert set(received.values()) == {1}  # every recipient exactly once
    (row,) = schedules(db)
    assert row.state == "done" and row.claimed_by == winner
