"""`clara-mail send` through click's CliRunner and as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import Result
from sqlalchemy import func, select

from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery
from tests.conftest import settings_env
from tests.send_helpers import add_recipients, start_sender
from tests.smtp_server import Faults, RecordingSMTPServer

Cli = Callable[..., Result]


def test_send_shows_the_plan_asks_and_sends(cli: Cli, db: Database, settings: Settings) -> None:
    add_recipients(db, 6)
    declined = cli("send", "newsletter-2022-01", "--segment", "local-police", input="n\n")
    assert declined.exit_code == 1
    assert "local-police" in declined.output and "Send 6 message(s)?" in declined.output
    assert not (settings.outbox_dir / "newsletter-2022-01").exists()

    result = cli("send", "newsletter-2022-01", "--segment", "local-police", input="y\n")
    assert result.exit_code == 0, result.output
    assert "6 sent" in result.output
    assert "Nothing went over the network" in result.output
    assert len(list((settings.outbox_dir / "newsletter-2022-01").glob("*.eml"))) == 6

    again = cli("send", "newsletter-2022-01", "--segment", "local-police", "--yes")
    assert again.exit_code == 0 and "Nothing to send." in again.output


def test_send_errors_are_one_line(cli: Cli, db: Database) -> None:
    result = cli("send", "no-such-campaign", "--yes")
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and result.output.startswith("Error:")
    result = cli("send", "newsletter-2022-01", "--segment", "nope", "--yes")
    assert result.exit_code == 1
    assert "unknown segment 'nope'" in result.output


def test_dry_run_and_test_to(cli: Cli, db: Database, settings: Settings) -> None:
    add_recipients(db, 4)
    result = cli("send", "newsletter-2022-01", "--segment", "local-police", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "local-police: 4 message(s) rendered" in result.output
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0
    with RecordingSMTPServer() as server:
        env_cli = Settings(**{**vars(settings), "smtp_url": server.url()})  # type: ignore[arg-type]
        from click.testing import CliRunner

        from clara_mailer.cli import main

        result = CliRunner().invoke(
            main,
            [
                "send",
                "newsletter-2022-01",
                "--segment",
                "local-police",
                "--test-to",
                "me@clara.example",
            ],
            env=settings_env(env_cli),
        )
        assert result.exit_code == 0, result.output
        assert {tuple(m.recipients) for m in server.messages} == {("me@clara.example",)}
        assert len(server.messages) == 2  # es and en for one segment
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0


def test_ctrl_c_finishes_in_flight_records_and_exits_130(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    add_recipients(db, 300)
    with RecordingSMTPServer() as server:
        env = {**os.environ, **settings_env(settings), "CLARA_SMTP_URL": server.url()}
        sender = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clara_mailer",
                "send",
                "newsletter-2022-01",
                "--segment",
                "local-police",
                "--yes",
                "--rate",
                "50",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while len(server.messages) < 20:
            assert time.monotonic() < deadline and sender.poll() is None
            time.sleep(0.01)
        sender.send_signal(signal.SIGINT)
        _, err = sender.communicate(timeout=60)
        received = {r for m in server.messages for r in m.recipients}
    assert sender.returncode == 130, err.decode()
    assert b"Interrupted" in err
    with db.session() as s:
        rows = s.execute(select(Delivery.email, Delivery.status, Delivery.worker_id)).all()
    sent = {email for email, status, _ in rows if status == "sent"}
    assert sent == received
    assert {status for _, status, _ in rows} == {"sent", "queued"}
    assert all(worker is None for _, _, worker in rows)


def test_ctrl_c_at_full_speed_gives_back_the_batch_claimed_ahead(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Without --rate or --limit the sender claims its next batch while it renders the
    last group of the one before: interrupted, it gives those rows back too (queued, no
    lease), and the next run sends everyone left, each once. (Whether a batch is claimed
    ahead at the moment of the interrupt depends on timing: two interrupted runs.)"""
    addresses = add_recipients(db, 600)
    args = ("newsletter-2022-01", "--segment", "local-police", "--yes")
    batches = {"CLARA_CLAIM_BATCH": "64"}  # claims of 64 rows: several in a run
    # Every reply 5 ms late: a run is still going when it is interrupted.
    with RecordingSMTPServer(faults=Faults(p_slow=1.0, slow_seconds=0.005)) as server:
        for _ in range(2):
            before = len(server.messages)
            sender = start_sender(settings, server.url(), tmp_path, *args, env=batches)
            deadline = time.monotonic() + 60
            while len(server.messages) < before + 100:  # past the first batch
                assert time.monotonic() < deadline and sender.poll() is None
                time.sleep(0.005)
            sender.send_signal(signal.SIGINT)
            _, err = sender.communicate(timeout=60)
            assert sender.returncode == 130, err.decode()
            with db.session() as s:
                rows = s.execute(select(Delivery.status, Delivery.worker_id)).all()
            assert {status for status, _ in rows} == {"sent", "queued"}
            assert all(worker is None for _, worker in rows)
            assert sum(status == "sent" for status, _ in rows) == len(server.messages) < 600
        last = start_sender(settings, server.url(), tmp_path, *args, env=batches)
        _, err = last.communicate(timeout=120)
        assert last.returncode == 0, err.decode()
        received = [r for m in server.messages for r in m.recipients]
    assert sorted(received) == sorted(addresses)  # everyone, once


def test_processes_share_the_campaign_and_send_each_message_once(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    addresses = add_recipients(db, 400)
    with RecordingSMTPServer() as server:
        sender = start_sender(
            settings,
            server.url(),
            tmp_path,
            "newsletter-2022-01",
            "--segment",
            "local-police",
            "--yes",
            "--processes",
            "2",
            "--concurrency",
            "2",
        )
        out, err = sender.communicate(timeout=120)
        received = [r for m in server.messages for r in m.recipients]
    assert sender.returncode == 0, err.decode()
    assert sorted(received) == sorted(addresses)  # everyone, once
    assert b"This run: 400 sent" in out  # the summary counts both processes
    with db.session() as s:
        statuses = s.scalars(select(Delivery.status).distinct()).all()
    assert statuses == ["sent"]


def test_the_program_ends_with_its_output_files_and_database_complete(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """``clara-mail`` (``cli.run``) leaves the exit's last garbage collection out: what
    the command wrote must be complete all the same, its output flushed, every message
    file whole and the database closed (on SQLite, no write-ahead log left behind)."""
    addresses = add_recipients(db, 12)
    db.dispose()  # this process's connections closed: the WAL is the command's alone
    env = {**os.environ, **settings_env(settings)}
    env.pop("CLARA_SMTP_URL", None)  # to the outbox
    done = subprocess.run(
        [sys.executable, "-m", "clara_mailer", "send", "newsletter-2022-01", "--yes"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    if settings.database_url.startswith("sqlite:///"):
        wal = Path(settings.database_url.removeprefix("sqlite:///") + "-wal")
        assert not wal.exists()
    out = done.stdout.decode()
    assert "will add 12 new, 0 skipped" in out
    assert out.rstrip().endswith("Campaign newsletter-2022-01: 12 sent")
    files = sorted((settings.outbox_dir / "newsletter-2022-01").glob("*.eml"))
    assert len(files) == 12
    for file in files:
        assert file.read_bytes().rstrip().endswith(b"--")  # the last MIME boundary
    with db.session() as s:
        rows = dict(s.execute(select(Delivery.email, Delivery.status)).all())
    assert rows == dict.fromkeys(addresses, "sent")
