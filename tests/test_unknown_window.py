"""The `unknown` window after kill -9 (hardening issue, item 3).

A real `clara-mail send --concurrency 4` is killed with SIGKILL at full speed against the
recording SMTP server, several times. After each kill the dead worker's rows are
recovered the way the next `send` recovers them (``expire_leases`` with the worker
journals) and compared with what the server received:

- a row the server never received must not become `unknown` (it goes back to the queue
  and is sent, once, by a later run);
- `unknown` holds at most about one message per connection per kill.

The figures are printed (``pytest -s``) for the issue::

    CLARA_TEST_PRINT=1 .venv/bin/python -m pytest -q -s tests/test_unknown_window.py
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from clara_mailer.core.settings import Settings
from clara_mailer.deliverylog.log import DeliveryLog, campaign_id_of
from clara_mailer.sending.journal import LOCAL_JOURNALS
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery
from tests.send_helpers import add_recipients, check_received_once, start_sender
from tests.smtp_server import RecordingSMTPServer

CAMPAIGN = "newsletter-2022-01"
# Every kill lands at full speed, a few hundred messages into a run, with hundreds still
# queued (asserted): enough for the window to show, small enough to run in seconds.
RECIPIENTS = 1200
CONCURRENCY = 4
KILL_AFTER = (150, 450, 750)


def _statuses(db: Database) -> dict[str, str]:
    with db.session() as s:
        return {e: st for e, st in s.execute(select(Delivery.email, Delivery.status))}


def _settle(server: RecordingSMTPServer) -> None:
    """Wait until the server has taken in whatever the dead sender had written."""
    count, stable_since = len(server.messages), time.monotonic()
    while time.monotonic() - stable_since < 0.3:
        time.sleep(0.02)
        if len(server.messages) != count:
            count, stable_since = len(server.messages), time.monotonic()


def test_unknown_after_kill_holds_only_what_may_have_been_delivered(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    add_recipients(db, RECIPIENTS)
    args = (CAMPAIGN, "--segment", "local-police", "--yes", "--concurrency", str(CONCURRENCY))
    figures = []
    with RecordingSMTPServer() as server:
        for kill_after in KILL_AFTER:
            sender = start_sender(settings, server.url(), tmp_path, *args, output=False)
            deadline = time.monotonic() + 120
            while len(server.messages) < kill_after and sender.poll() is None:
                assert time.monotonic() < deadline, "the sender made no progress"
                time.sleep(0.002)
            assert sender.poll() is None, f"finished before the kill at {kill_after}"
            sender.send_signal(signal.SIGKILL)
            sender.wait()
            _settle(server)
            before = _statuses(db)
            in_flight = sum(1 for st in before.values() if st == "sending")
            # What the next `send` does first: recover the dead worker's rows.
            log = DeliveryLog(db, campaign_id_of(db, CAMPAIGN))
            log.expire_leases(LOCAL_JOURNALS)
            after = _statuses(db)
            received = {r for m in server.messages for r in m.recipients}
            new_unknown = [
                e for e, st in after.items() if st == "unknown" and before[e] != "unknown"
            ]
            never_received = [e for e in new_unknown if e not in received]
            figures.append((kill_after, in_flight, len(new_unknown), len(never_received)))
            assert "sending" not in after.values()
            # Nothing that did not reach the server is left `unknown`...
            assert never_received == [], (kill_after, never_received)
            # ...and what is, is at most about one message per connection.
            assert len(new_unknown) <= CONCURRENCY + 1, (kill_after, len(new_unknown))
        final = start_sender(settings, server.url(), tmp_path, *args)
        _, err = final.communicate(timeout=300)
        assert final.returncode == 0, err.decode()
        received_count = Counter(r for m in server.messages for r in m.recipients)

    statuses = check_received_once(db, received_count, RECIPIENTS)
    for kill_after, in_flight, unknown, never in figures:
        print(
            f"kill after {kill_after}: {in_flight} rows `sending`, {unknown} became unknown, "
            f"{never} of them never received"
        )
    print(f"final: {dict(statuses)}")
    assert statuses["unknown"] <= len(KILL_AFTER) * (CONCURRENCY + 1)


# -- the journal and its reading, step by step ---------------------------------------------


def _plan(db: Database, settings: Settings, count: int) -> int:
    from clara_mailer.mailer import Mailer
    from clara_mailer.plan.plan import SendOptions

    add_recipients(db, count)
    return (
        Mailer(settings, database=db)
        .plan(CAMPAIGN, SendOptions(segments=("local-police",)))
        .campaign_id
    )


def _rows(db: Database) -> dict[int, tuple[str, int | None, int]]:
    with db.session() as s:
        return {
            i: (st, code, attempts)
            for i, st, code, attempts in s.execute(
                select(Delivery.id, Delivery.status, Delivery.smtp_code, Delivery.attempts)
            )
        }


def test_a_dead_workers_rows_are_settled_from_its_journal(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    from clara_mailer.core.vocabulary import Status
    from clara_mailer.sending.journal import LocalJournals, WorkerJournal

    campaign_id = _plan(db, settings, 6)
    # A worker of this host whose process is gone (pid 2**22 + 1 is beyond pid_max).
    import socket

    dead = f"{socket.gethostname()[:30]}:{2**22 + 1}:deadbeef"
    log = DeliveryLog(db, campaign_id, dead)
    rows = [r.id for r in log.claim(6, 600)]
    log.mark_sending([(i, f"<{i}@x>", f"h{i}") for i in rows[:5]], "newsletter")
    journal = WorkerJournal.create(dead, tmp_path)
    assert journal is not None
    journal.end_of_data(rows[0])  # 250 read, not committed yet
    journal.reply(rows[0], Status.SENT, 250)
    journal.end_of_data(rows[1])  # 550 read
    journal.reply(rows[1], Status.FAILED, 550)
    journal.end_of_data(rows[2])  # 451 read: not delivered
    journal.reply(rows[2], Status.DEFERRED, 451)
    journal.end_of_data(rows[3])  # end of DATA written, no reply: maybe delivered
    # rows[4]: `sending` but never on the wire; rows[5]: claimed, untouched.
    journal.close(remove=False)  # the process died: the file stays

    journals = LocalJournals(tmp_path)
    DeliveryLog(db, campaign_id).expire_leases(journals)
    after = _rows(db)
    assert after[rows[0]] == ("sent", 250, 1)
    assert after[rows[1]] == ("failed", 550, 1)
    assert after[rows[2]][0] == "queued"
    assert after[rows[3]][0] == "unknown"
    assert after[rows[4]] == ("queued", None, 0)
    assert after[rows[5]] == ("queued", None, 0)
    assert not (tmp_path / journal.path.name).exists()  # settled: discarded
    with db.session() as s:
        assert s.scalar(select(Delivery.sent_at).where(Delivery.id == rows[0])) is not None
        leased = s.scalars(select(Delivery.id).where(Delivery.worker_id.is_not(None))).all()
    assert leased == []


def test_a_reply_goes_to_the_file_with_the_next_end_of_data(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Reply records wait for the next end of DATA (one write for both) or ``flush``.
    A worker killed with a reply not yet written leaves that message ``unknown``: the
    connection's last ended message, as if the reply had not come."""
    import socket

    from clara_mailer.core.vocabulary import Status
    from clara_mailer.sending.journal import LocalJournals, WorkerJournal

    campaign_id = _plan(db, settings, 3)
    dead = f"{socket.gethostname()[:30]}:{2**22 + 3}:cafebabe"
    log = DeliveryLog(db, campaign_id, dead)
    rows = [r.id for r in log.claim(3, 600)]
    log.mark_sending([(i, f"<{i}@x>", f"h{i}") for i in rows], "newsletter")
    journal = WorkerJournal.create(dead, tmp_path)
    assert journal is not None
    journal.end_of_data(rows[0])
    size = journal.path.stat().st_size
    journal.reply(rows[0], Status.SENT, 250)
    assert journal.path.stat().st_size == size  # held
    journal.end_of_data(rows[1])  # carries rows[0]'s reply
    assert journal.path.stat().st_size == size + 2 * 16
    journal.reply(rows[1], Status.FAILED, 550)
    journal.end_of_data(rows[2])
    journal.reply(rows[2], Status.SENT, 250)  # held when the process dies
    # Killed: no flush, no close. The descriptor is left open, as a killed process's is
    # closed by the kernel without writing anything more.
    journals = LocalJournals(tmp_path)
    DeliveryLog(db, campaign_id).expire_leases(journals)
    after = _rows(db)
    assert after[rows[0]] == ("sent", 250, 1)
    assert after[rows[1]] == ("failed", 550, 1)
    assert after[rows[2]][0] == "unknown"


def test_flush_writes_the_replies_held(tmp_path: Path) -> None:
    from clara_mailer.core.vocabulary import Status
    from clara_mailer.sending.journal import WorkerJournal

    journal = WorkerJournal.create("host:1:flush", tmp_path)
    assert journal is not None
    journal.end_of_data(7)
    journal.reply(7, Status.SENT, 250)
    size = journal.path.stat().st_size
    journal.flush()
    assert journal.path.stat().st_size == size + 16
    journal.flush()  # nothing more to write
    assert journal.path.stat().st_size == size + 16
    journal.close(remove=True)


def test_without_a_trustworthy_journal_sending_rows_become_unknown(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    import socket

    from clara_mailer.sending import journal as journal_module
    from clara_mailer.sending.journal import LocalJournals, WorkerJournal

    campaign_id = _plan(db, settings, 4)
    host = socket.gethostname()[:30]
    no_journal, old_boot = f"{host}:{2**22 + 1}:aaaaaaaa", f"{host}:{2**22 + 2}:bbbbbbbb"
    for worker, ids in ((no_journal, 2), (old_boot, 2)):
        log = DeliveryLog(db, campaign_id, worker)
        rows = [r.id for r in log.claim(ids, 600)]
        log.mark_sending([(i, f"<{i}@x>", f"h{i}") for i in rows], "newsletter")
    # A journal written before a reboot (its tail may be lost): not trusted.
    real = journal_module.boot_marker
    journal_module.boot_marker = lambda: "an-earlier-boot"  # type: ignore[assignment]
    try:
        journal = WorkerJournal.create(old_boot, tmp_path)
    finally:
        journal_module.boot_marker = real  # type: ignore[assignment]
    assert journal is not None
    journal.close(remove=False)
    DeliveryLog(db, campaign_id).expire_leases(LocalJournals(tmp_path))
    assert [st for st, _, _ in _rows(db).values()] == ["unknown"] * 4


def test_a_clean_run_leaves_no_journal_behind(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"  # the senders' temp dir: their journals go there
    temp.mkdir()
    with RecordingSMTPServer() as server:
        add_recipients(db, 30)
        args = (CAMPAIGN, "--segment", "local-police", "--yes", "--processes", "2")
        sender = start_sender(settings, server.url(), tmp_path, *args, env={"TMPDIR": str(temp)})
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err.decode()
        assert len(server.messages) == 30
    journals = list(temp.glob("clara-mail*/journal"))
    assert journals, "the senders kept no journal"
    assert [p.name for p in journals[0].iterdir()] == []
