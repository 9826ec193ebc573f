"""Several sender processes on one database share a campaign (issue: scale-out).

Runs on both backends: PostgreSQL coordinates with FOR UPDATE SKIP LOCKED; SQLite
serialises the short claim transactions (BEGIN IMMEDIATE) on one machine.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select, text

from clara_mailer.core.errors import DatabaseError
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.deliverylog.log import DeliveryLog
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.reporting.report import build_report
from clara_mailer.store.copying import copy_database
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Delivery, Recipient, utcnow
from tests.conftest import PG_URL, TEST_SECRET, _new_postgres_database
from tests.send_helpers import add_recipients, check_received_once, start_sender
from tests.smtp_server import RecordingSMTPServer

CAMPAIGN = "newsletter-2022-01"


def sender(
    settings: Settings, server: RecordingSMTPServer, cwd: Path, output: bool
) -> subprocess.Popen[bytes]:
    args = (CAMPAIGN, "--segment", "local-police", "--yes", "--concurrency", "4")
    return start_sender(
        settings, server.url(), cwd, *args, output=output, env={"CLARA_CLAIM_BATCH": "200"}
    )


def test_three_workers_one_killed_everyone_received_exactly_once(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    total = 2400  # claim batches of 200: several per worker before and after the kill
    add_recipients(db, total)
    # Plan once up front so the three workers start on the same queue at once.
    Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    with RecordingSMTPServer() as server:
        # The one to be killed gets no pipes: nothing left open behind it.
        workers = [sender(settings, server, tmp_path, output) for output in (True, False, True)]
        deadline = time.monotonic() + 240
        while len(server.messages) < total // 2:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait()  # reaped, as a shell or supervisor would
        for w in (workers[0], workers[2]):
            _, err = w.communicate(timeout=300)
            assert w.returncode == 0, err.decode()
        received = Counter(r for m in server.messages for r in m.recipients)

    statuses = check_received_once(db, received, total)
    assert statuses["unknown"] <= 100  # at most what the killed worker had in flight
    # The report's figures match the server's: every `sent` arrived, and what else
    # arrived is among the `unknown`.
    report = build_report(db, CAMPAIGN)
    assert report.totals["sent"] == statuses["sent"]
    assert report.totals["unknown"] == statuses["unknown"]
    assert statuses["sent"] <= len(received) <= statuses["sent"] + statuses["unknown"]


def test_claims_are_disjoint_between_workers(db: Database, settings: Settings) -> None:
    add_recipients(db, 300)
    plan = Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    a = DeliveryLog(db, plan.campaign_id, "host:1:a")
    b = DeliveryLog(db, plan.campaign_id, "host:2:b")
    first = {r.id for r in a.claim(200, 60)}
    second = {r.id for r in b.claim(200, 60)}
    assert len(first) == 200 and len(second) == 100
    assert not first & second
    assert b.claim(10, 60) == []


def test_expired_lease_makes_in_flight_unknown_and_untouched_claimable(
    db: Database, settings: Settings
) -> None:
    add_recipients(db, 10)
    plan = Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    dead = DeliveryLog(db, plan.campaign_id, "otherhost:1:dead")
    rows = dead.claim(10, lease_seconds=0)
    dead.mark_sending([(r.id, f"<{r.id}@x>", "h") for r in rows[:3]], "newsletter")
    time.sleep(0.01)
    alive = DeliveryLog(db, plan.campaign_id, "host:2:alive")
    assert alive.expire_leases() == 3
    again = alive.claim(20, 60)
    assert {r.id for r in again} == {r.id for r in rows[3:]}
    with db.session() as s:
        unknown = s.scalars(select(Delivery.id).where(Delivery.status == "unknown")).all()
    assert set(unknown) == {r.id for r in rows[:3]}


def test_rate_limit_is_shared_through_the_campaign_row(db: Database, settings: Settings) -> None:
    add_recipients(db, 10)
    plan = Mailer(settings, database=db).plan(
        CAMPAIGN, SendOptions(segments=("local-police",), rate=10)
    )
    a = DeliveryLog(db, plan.campaign_id, "h:1:a")
    b = DeliveryLog(db, plan.campaign_id, "h:2:b")
    start_a = a.reserve_rate_window(10, 10.0)
    start_b = b.reserve_rate_window(10, 10.0)
    # Worker b may start only when a's ten messages at ten a second are through.
    assert abs((start_b - start_a).total_seconds() - 1.0) < 0.05
    with db.session() as s:
        assert s.scalar(select(Campaign.rate_limit).where(Campaign.id == plan.campaign_id)) == 10


@pytest.mark.skipif(not PG_URL, reason="needs the PostgreSQL server")
def test_claim_path_uses_indexes_on_a_large_campaign() -> None:
    url, drop = _new_postgres_database()
    try:
        pg = Database(url)
        pg.ensure_current()
        with pg.session() as s:
            s.add(Campaign(slug="big", kind="newsletter"))
        with pg.engine.begin() as conn:
            cid = conn.scalar(text("SELECT id FROM campaigns WHERE slug = 'big'"))
            conn.execute(
                text(
                    "INSERT INTO deliveries (campaign_id, segment, language, status, attempts, created_at) "
                    "SELECT :c, 'local-police', 'es', "
                    "CASE WHEN g % 50 = 0 THEN 'queued' WHEN g % 97 = 0 THEN 'deferred' ELSE 'sent' END, "
                    "0, now() FROM generate_series(1, 1000000) g"
                ),
                {"c": cid},
            )
            conn.execute(text("ANALYZE deliveries"))
        log = DeliveryLog(pg, cid, "h:1:x")
        with pg.engine.connect() as conn:
            for query in log.claim_queries(utcnow(), 500):
                compiled = query.compile(pg.engine, compile_kwargs={"literal_binds": True})
                plan = "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {compiled}")))
                assert "Seq Scan on deliveries" not in plan, plan
                # The claim index, or the partial index of unsent rows (migration 0005),
                # which PostgreSQL may find cheaper when most of the log is sent.
                assert "ix_deliveries_claim" in plan or "ix_deliveries_unsent" in plan, plan
        pg.dispose()
    finally:
        drop()


@pytest.mark.skipif(not PG_URL, reason="needs the PostgreSQL server")
def test_copy_sqlite_registry_and_log_to_postgresql(tmp_path: Path) -> None:
    source_settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'src.db'}",
        outbox_dir=tmp_path / "outbox",
        secret_key=TEST_SECRET,
        templates_dir=EMAIL_TEMPLATES,
    )
    source = Database(source_settings.database_url)
    source.ensure_current()
    add_recipients(source, 50)
    opts = SendOptions(segments=("local-police",))
    plan = Mailer(source_settings, database=source).plan(CAMPAIGN, opts)
    Mailer(source_settings, database=source).send(plan, opts, handle_signals=False)
    url, drop = _new_postgres_database()
    try:
        target = Database(url)
        report = copy_database(source, target)
        assert report.rows["recipients"] == 50 and report.rows["deliveries"] == 50
        with target.session() as s:
            assert s.scalar(select(Recipient.id).order_by(Recipient.id.desc()).limit(1)) == 50
            s.add(Recipient(email="new@x.example", email_key="new@x.example"))
        with target.session() as s:  # sequences moved past the copied ids
            assert s.scalar(select(Recipient.id).where(Recipient.email == "new@x.example")) == 51
        with pytest.raises(DatabaseError, match="empty database"):
            copy_database(source, target)
        target.dispose()
    finally:
        source.dispose()
        drop()


@pytest.mark.parametrize("adopted", [True, False])
def test_a_helper_process_sends_the_variants_its_parent_checked(
    settings: Settings, tmp_path: Path, adopted: bool
) -> None:
    """``send --processes``: a helper is handed the variants its parent checked, so it
    sends exactly those, even if a template changes after the check (and it does not
    inline the CSS again). Without them (the control) it would render the new text."""
    import dataclasses
    import email
    import email.policy
    import gc
    import multiprocessing
    import queue as queues
    import threading

    from clara_mailer.sending.worker import _helper_main

    templates = tmp_path / "templates"
    shutil.copytree(EMAIL_TEMPLATES, templates)
    settings = dataclasses.replace(settings, templates_dir=templates)
    mailer = Mailer(settings)
    add_recipients(mailer.db, 6, language="es")
    options = SendOptions(segments=("local-police",))
    plan = mailer.plan(CAMPAIGN, options)
    assert plan.renderer is not None
    variants = plan.renderer.prepared() if adopted else {}
    template = templates / CAMPAIGN / "es.html.j2"
    template.write_text(template.read_text().replace("Boletín de resultados", "ZQXCHANGED"))
    updates: queues.Queue[tuple[int, dict[str, int], bool, str | None]] = queues.Queue()
    # What the parent's ``go`` hands a helper, through a pipe as between processes.
    theirs, ours = multiprocessing.Pipe(duplex=False)
    go = threading.Thread(target=ours.send, args=((plan.campaign_id, plan.segments, variants),))
    go.start()
    _helper_main(0, settings, mailer.signer, CAMPAIGN, options, theirs, updates)
    gc.unfreeze()  # a helper freezes what it loaded: its process ends with the send
    go.join()
    ours.close()
    mailer.close()
    *_, (_, counts, interrupted, error) = [updates.get_nowait() for _ in range(updates.qsize())]
    assert (counts, interrupted, error) == ({"sent": 6}, False, None)
    texts = []
    for path in sorted((settings.outbox_dir / CAMPAIGN).glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        parts = [p for p in message.walk() if p.get_content_maintype() == "text"]
        texts.append("".join(part.get_content() for part in parts))
    assert len(texts) == 6
    changed = ["ZQXCHANGED" in text for text in texts]
    assert changed == [not adopted] * 6
