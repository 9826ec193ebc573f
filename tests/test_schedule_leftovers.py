"""Scheduled sends, the leftovers: a runner killed mid-send does not leave its schedule
`running` for ever (the next runner and `scheduled list` see it is gone and mark it failed,
saying why; it is never started twice at once), and `send --at --processes N` keeps N."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import select

from clara_mailer.audience.schedule import (
    STALE_SECONDS,
    reap_dead_runners,
    run_due,
    runner_id,
)
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import Database
from clara_mailer.store.models import Schedule, utcnow
from tests.conftest import settings_env
from tests.send_helpers import add_recipients, check_received_once, start_sender
from tests.smtp_server import Faults, RecordingSMTPServer
from tests.test_schedule import make_due

Cli = Callable[..., Result]
CAMPAIGN = "newsletter-2022-01"


def later(hours: float = 2) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)).isoformat(timespec="minutes")


def the_schedule(db: Database) -> Schedule:
    with db.session() as s:
        (row,) = s.scalars(select(Schedule))
        return row


def start_runner(
    settings: Settings, smtp_url: str, cwd: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """A real `clara-mail scheduled run` process, as cron starts it."""
    env = {**os.environ, **settings_env(settings), "CLARA_SMTP_URL": smtp_url, **extra}
    return subprocess.Popen(
        [sys.executable, "-m", "clara_mailer", "scheduled", "run"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def listed(cli: Cli) -> dict[str, object]:
    result = cli("scheduled", "list", "--format", "json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    return dict(row)


# -- a runner killed mid-send ---------------------------------------------------------------


def test_a_killed_runner_leaves_a_failed_schedule_that_can_be_resumed(
    cli: Cli, db: Database, settings: Settings, tmp_path: Path
) -> None:
    total = 300
    add_recipients(db, total, "local-police")
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--concurrency", "1",
               "--at", later()).exit_code == 0  # fmt: skip
    make_due(db)
    slow = Faults(p_slow=1.0, slow_seconds=0.02)  # ~6 s for the whole send
    with RecordingSMTPServer(faults=slow) as server:
        runner = start_runner(settings, server.url(), tmp_path)
        try:
            wait_until(lambda: len(server.messages) >= 20, 60, "the scheduled send never began")
            assert runner.poll() is None, "finished before the kill"
            # Alive: listed as running, and a second runner does not start it again.
            assert listed(cli)["state"] == "running"
            again = cli("scheduled", "run")
            assert again.exit_code == 0 and "No scheduled send is due" in again.output
            assert the_schedule(db).state == "running"
            runner.send_signal(signal.SIGKILL)
            runner.wait()
        finally:
            if runner.poll() is None:
                runner.kill()
            runner.communicate()
        time.sleep(0.3)
        stopped_at = len(server.messages)
        assert stopped_at < total

        # `scheduled list` sees the runner is gone: failed, saying why and what to do.
        row = listed(cli)
        assert row["state"] == "failed", row
        result = str(row["result"])
        assert "stopped before the send finished (killed or crashed)" in result
        assert f"clara-mail send {CAMPAIGN}" in result and row["finished_at"]
        # The next runner does not start it again (never twice), nor does anything else.
        again = cli("scheduled", "run")
        assert again.exit_code == 0 and "No scheduled send is due" in again.output
        assert len(server.messages) == stopped_at
        # It can be run again: `send` resumes it, nobody receives it twice.
        resume = start_sender(settings, server.url(), tmp_path, CAMPAIGN, "--yes")
        _, err = resume.communicate(timeout=300)
        assert resume.returncode == 0, err.decode()
        received = Counter(r for m in server.messages for r in m.recipients)
    statuses = check_received_once(db, received, total)
    assert statuses["unknown"] <= 1, statuses
    # And scheduled again, as a new schedule (the failed one no longer blocks it).
    assert cli("send", CAMPAIGN, "--at", later()).exit_code == 0


def test_the_next_runner_marks_a_dead_runners_schedule_failed(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The same without `scheduled list`: the next `scheduled run` notices first."""
    add_recipients(db, 2, "local-police")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a runner of this host whose process has ended
    with db.session() as s:
        s.add(
            Schedule(
                campaign=CAMPAIGN,
                options=json.dumps({"segments": ["local-police"]}),
                due_at=utcnow() - dt.timedelta(minutes=5),
                state="running",
                claimed_by=runner_id().replace(f":{os.getpid()}:", f":{dead.pid}:"),
                claimed_at=utcnow(),
                started_at=utcnow(),
            )
        )
    signer = TokenSigner(db.secret_key(settings))
    assert run_due(db, settings, signer) == []  # nothing started...
    row = the_schedule(db)
    assert row.state == "failed" and "killed or crashed" in row.result  # ...but noticed


def test_a_runner_of_another_host_is_trusted_until_its_heartbeat_is_stale(
    db: Database,
) -> None:
    now = utcnow()
    with db.session() as s:
        s.add(
            Schedule(
                campaign=CAMPAIGN,
                options="{}",
                due_at=now - dt.timedelta(hours=1),
                state="running",
                claimed_by="another-host.example:4242:0f0e0d0c",
                claimed_at=now - dt.timedelta(seconds=STALE_SECONDS - 60),
                started_at=now - dt.timedelta(hours=1),
            )
        )
    assert reap_dead_runners(db, now) == 0  # heard from a minute before the limit
    assert the_schedule(db).state == "running"
    assert reap_dead_runners(db, now + dt.timedelta(seconds=120)) == 1
    row = the_schedule(db)
    assert row.state == "failed" and "no sign of life" in row.result


def test_a_running_schedule_renews_its_heartbeat(db: Database, settings: Settings) -> None:
    add_recipients(db, 60, "local-police")
    with db.session() as s:
        s.add(
            Schedule(
                campaign=CAMPAIGN,
                options=json.dumps({"segments": ["local-police"], "concurrency": 1}),
                due_at=utcnow() - dt.timedelta(seconds=1),
                state="due",
            )
        )
    signer = TokenSigner(db.secret_key(settings))
    seen: list[dt.datetime] = []
    slow = Faults(p_slow=1.0, slow_seconds=0.03)  # ~2 s of sending
    with RecordingSMTPServer(faults=slow) as server:
        smtp = Settings(**{**vars(settings), "smtp_url": server.url()})
        done = threading.Event()

        def run() -> None:
            try:
                run_due(db, smtp, signer, heartbeat_seconds=0.1)
            finally:
                done.set()

        thread = threading.Thread(target=run)
        thread.start()
        while not done.is_set():
            row = the_schedule(db)
            if row.state == "running" and row.claimed_at is not None:
                seen.append(row.claimed_at)
            time.sleep(0.05)
        thread.join()
        assert len(server.messages) == 60
    row = the_schedule(db)
    assert row.state == "done", row.result
    assert row.started_at is not None and max(seen) > row.started_at  # renewed while sending


# -- send --at --processes N -------------------------------------------------------------------


def test_processes_is_kept_and_used_by_the_runner(
    cli: Cli, db: Database, settings: Settings, tmp_path: Path
) -> None:
    total = 400
    add_recipients(db, total, "local-police")
    result = cli("send", CAMPAIGN, "--segment", "local-police", "--concurrency", "1",
                 "--processes", "2", "--at", later())  # fmt: skip
    assert result.exit_code == 0, result.output
    options = json.loads(the_schedule(db).options)
    assert options["processes"] == 2 and options["concurrency"] == 1
    assert listed(cli)["processes"] == 2
    make_due(db)
    slow = Faults(p_slow=1.0, slow_seconds=0.01)  # ~4 s on one connection: the helper joins
    with RecordingSMTPServer(faults=slow) as server:
        # Small claims (64 rows), so that the first process does not take all at once.
        runner = start_runner(settings, server.url(), tmp_path, CLARA_CLAIM_BATCH="1")
        out, err = runner.communicate(timeout=300)
        assert runner.returncode == 0, (out + err).decode()
        assert f"{CAMPAIGN} (schedule 1): done" in out.decode()
        received = Counter(r for m in server.messages for r in m.recipients)
        # One connection per process (--concurrency 1): two processes sent.
        connections = {m.connection for m in server.messages}
    assert len(connections) == 2, connections
    check_received_once(db, received, total)


def test_a_schedule_without_processes_sends_with_one(cli: Cli, db: Database) -> None:
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--at", later()).exit_code == 0
    assert json.loads(the_schedule(db).options)["processes"] == 1


@pytest.mark.parametrize("bad", ["0", "65", "two"])
def test_a_bad_processes_count_is_refused_before_recording(
    cli: Cli, db: Database, bad: str
) -> None:
    result = cli("send", CAMPAIGN, "--processes", bad, "--at", later())
    assert result.exit_code == 2
    with db.session() as s:
        assert s.scalars(select(Schedule)).first() is None
