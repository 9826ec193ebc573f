"""The sending engine against real SMTP servers (aiosmtpd) and real databases."""

from __future__ import annotations

import email
import email.policy
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select, update

from clara_mailer.core.errors import NotFound, SendError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.optouts.suppressions import suppress
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Delivery
from tests.send_helpers import add_recipients
from tests.smtp_server import DROP_AFTER_DATA, SLOW_AFTER_DATA, Faults, RecordingSMTPServer

CAMPAIGN = "newsletter-2022-01"


def smtp_settings(settings: Settings, server: RecordingSMTPServer, **extra: object) -> Settings:
    values = {**vars(settings), "smtp_url": server.url(), "retry_in_run": "0.2,0.4", **extra}
    return Settings(**values)  # type: ignore[arg-type]


def deliveries(db: Database, slug: str = CAMPAIGN) -> dict[str, Delivery]:
    with db.session() as s:
        rows = s.scalars(select(Delivery).join(Campaign).where(Campaign.slug == slug)).all()
        return {d.email or "": d for d in rows}


def send(db: Database, settings: Settings, **options: object) -> object:
    opts = SendOptions(segments=("local-police",), **options)  # type: ignore[arg-type]
    plan = Mailer(settings, database=db).plan(CAMPAIGN, opts)
    return Mailer(settings, database=db).send(plan, opts, handle_signals=False)


def test_outbox_is_the_default_and_a_rerun_sends_nothing(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 25)
    summary = send(db, settings)
    files = sorted((settings.outbox_dir / CAMPAIGN).glob("*.eml"))
    assert len(files) == 25
    assert summary.counts == Counter({"sent": 25})  # type: ignore[attr-defined]
    assert not summary.network  # type: ignore[attr-defined]
    received = {
        email.message_from_bytes(f.read_bytes(), policy=email.policy.default)["To"]
        .addresses[0]
        .addr_spec
        for f in files
    }
    assert received == set(addresses)
    log = deliveries(db)
    assert {d.status for d in log.values()} == {"sent"}
    assert all(d.message_id and d.sent_at and d.attempts == 1 for d in log.values())

    again = send(db, settings)
    assert again.counts == Counter()  # type: ignore[attr-defined]
    assert len(list((settings.outbox_dir / CAMPAIGN).glob("*.eml"))) == 25


def test_log_matches_what_the_server_accepted(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 60)
    refused = {addresses[3]: (550, "5.1.1 no such user"), addresses[10]: (553, "5.1.3 bad address")}
    with RecordingSMTPServer(faults=Faults(replies=refused)) as server:
        send(db, smtp_settings(settings, server), concurrency=3)
        accepted = Counter(r for m in server.messages for r in m.recipients)
        by_id = {m.message_id: m for m in server.messages}
    log = deliveries(db)
    for address in addresses:
        row = log[address]
        if address in refused:
            assert row.status == "failed"
            assert row.smtp_code == refused[address][0]
            assert refused[address][1] in (row.smtp_reply or "")
            assert accepted[address] == 0
        else:
            assert row.status == "sent", (address, row.status, row.smtp_reply)
            assert row.smtp_code == 250
            assert accepted[address] == 1
            assert by_id[row.message_id].recipients == [address]
    assert max(accepted.values()) == 1


def test_faults_end_in_the_right_state_and_nothing_is_accepted_twice(
    db: Database, settings: Settings
) -> None:
    addresses = add_recipients(db, 120)
    scripted = {
        addresses[0]: (550, "5.1.1 user unknown"),
        addresses[1]: (452, "4.2.2 mailbox full"),
        addresses[2]: DROP_AFTER_DATA,
        addresses[3]: SLOW_AFTER_DATA,
    }
    faults = Faults(
        replies=scripted,
        greylist=True,
        p421=0.05,
        drop_stage="rcpt",
        p_drop=0.05,
        slow_seconds=1.5,
        seed=11,
    )
    with RecordingSMTPServer(faults=faults) as server:
        # Six short retries: a recipient greylisted and then unlucky six times in a row
        # (10% each) is a one-in-a-million event.
        fast = smtp_settings(
            settings,
            server,
            smtp_timeout=1.0,
            smtp_data_timeout=0.5,
            retry_in_run="0.1,0.1,0.2,0.2,0.3,0.3",
        )
        send(db, fast, concurrency=4)
        accepted = Counter(r for m in server.messages for r in m.recipients)
    log = deliveries(db)
    assert max(accepted.values()) == 1, "a message was accepted twice"
    assert log[addresses[0]].status == "failed" and log[addresses[0]].smtp_code == 550
    assert log[addresses[1]].status == "deferred" and log[addresses[1]].smtp_code == 452
    assert log[addresses[1]].next_attempt_at is not None
    # The server read the whole message but never answered: maybe delivered.
    assert log[addresses[2]].status == "unknown"
    assert log[addresses[3]].status == "unknown" and accepted[addresses[3]] == 1
    for address in addresses[4:]:
        # Greylisted first, random 421s and drops: all retried within the run.
        assert log[address].status == "sent", (address, log[address].smtp_reply)
        assert accepted[address] == 1
        assert log[address].attempts >= 2  # greylisting refused every first try
    for address, row in log.items():
        assert (accepted[address] == 1) == (row.status == "sent") or row.status == "unknown"


def test_deferred_are_retried_by_the_next_send_when_due(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 5)
    faults = Faults(replies={addresses[0]: (451, "4.3.0 try later")})
    with RecordingSMTPServer(faults=faults) as server:
        fast = smtp_settings(settings, server)
        send(db, fast)
        row = deliveries(db)[addresses[0]]
        assert row.status == "deferred" and row.attempts == 3  # first try + two in-run retries
        # Not due yet: the next send leaves it alone.
        assert send(db, fast).counts == Counter()  # type: ignore[attr-defined]
        with db.session() as s:
            s.execute(
                update(Delivery).where(Delivery.id == row.id).values(next_attempt_at=row.created_at)
            )
        server.faults = Faults()
        assert send(db, fast).counts == Counter({"sent": 1})  # type: ignore[attr-defined]
    assert deliveries(db)[addresses[0]].status == "sent"


def test_retry_gives_up_after_the_configured_age(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 2)
    with RecordingSMTPServer(faults=Faults(replies={addresses[0]: (451, "4.3.0 later")})) as server:
        send(db, smtp_settings(settings, server, retry_expire=0, retry_in_run=""))
    row = deliveries(db)[addresses[0]]
    assert row.status == "failed" and "gave up" in (row.smtp_reply or "")


def test_opt_out_during_a_running_campaign_is_honoured(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 40)
    late = addresses[-5:]
    signer = TokenSigner(db.secret_key(settings))
    with RecordingSMTPServer() as server:

        def opt_out_when_started() -> None:
            deadline = time.monotonic() + 30
            while not server.messages and time.monotonic() < deadline:
                time.sleep(0.01)
            with db.session() as s:
                for address in late:
                    suppress(s, signer, address, reason="one-click", source=CAMPAIGN)

        thread = threading.Thread(target=opt_out_when_started)
        thread.start()
        # 20 messages/s: the run lasts about two seconds, the opt-out comes at once.
        send(db, smtp_settings(settings, server), rate=20, concurrency=1)
        thread.join()
        accepted = {r for m in server.messages for r in m.recipients}
    log = deliveries(db)
    for address in late:
        assert address not in accepted
        assert log[address].status == "skipped"
        assert "one-click" in (log[address].smtp_reply or "")
    assert len(accepted) == 35


def test_suppressed_at_plan_time_are_skipped(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 4)
    signer = TokenSigner(db.secret_key(settings))
    with db.session() as s:
        suppress(s, signer, addresses[1].upper(), reason="unsubscribe")
        suppress(s, signer, addresses[2], reason="manual", scope="invitation")
    plan = Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    assert plan.skipped == 1 and plan.added == 3
    assert deliveries(db)[addresses[1]].status == "skipped"
    assert deliveries(db)[addresses[2]].status == "queued"  # invitation-only opt-out


def test_recipient_in_two_segments_is_planned_once(db: Database, settings: Settings) -> None:
    police = add_recipients(db, 3, "local-police")
    add_recipients(db, 2, "associations", prefix="asoc", domain="asociacion.example")
    from tests.send_helpers import add_to_segment

    add_to_segment(db, police[0], "associations")
    opts = SendOptions(segments=("associations", "local-police"))
    plan = Mailer(settings, database=db).plan(CAMPAIGN, opts)
    assert plan.added == 5
    assert deliveries(db)[police[0]].segment == "associations"


def test_unknown_segment_and_changed_templates_are_refused(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    add_recipients(db, 2)
    with pytest.raises(NotFound, match="unknown segment 'nope'"):
        Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("nope",)))
    # Planned but nothing sent yet: editing the templates is fine.
    Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    with db.session() as s:
        s.execute(update(Campaign).where(Campaign.slug == CAMPAIGN).values(template_hash="1" * 64))
    send(db, settings)
    with db.session() as s:
        s.execute(update(Campaign).where(Campaign.slug == CAMPAIGN).values(template_hash="0" * 64))
    with pytest.raises(SendError, match="--allow-changed-templates"):
        Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    Mailer(settings, database=db).plan(
        CAMPAIGN,
        SendOptions(segments=("local-police",), allow_changed_templates=True),
    )


def test_limit_sends_only_that_many_and_releases_the_rest(db: Database, settings: Settings) -> None:
    add_recipients(db, 30)
    summary = send(db, settings, limit=7)
    assert summary.counts == Counter({"sent": 7})  # type: ignore[attr-defined]
    statuses = Counter(d.status for d in deliveries(db).values())
    assert statuses == Counter({"sent": 7, "queued": 23})
    assert all(d.worker_id is None for d in deliveries(db).values())
    assert send(db, settings).counts == Counter({"sent": 23})  # type: ignore[attr-defined]


def test_resend_unknown_keeps_the_message_id(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 3)
    with RecordingSMTPServer(faults=Faults(replies={addresses[0]: DROP_AFTER_DATA})) as server:
        fast = smtp_settings(settings, server, smtp_data_timeout=0.5)
        send(db, fast)
        first = deliveries(db)[addresses[0]]
        assert first.status == "unknown"
        server.faults = Faults()
        assert send(db, fast).counts == Counter()  # type: ignore[attr-defined]
        send(db, fast, resend_unknown=True)
        ids = [m.message_id for m in server.messages if m.recipients == [addresses[0]]]
    assert deliveries(db)[addresses[0]].status == "sent"
    assert ids[-1] == first.message_id
    assert len(set(ids)) == 1


def test_smtputf8_recipient_fails_clearly_without_the_extension(
    db: Database, settings: Settings
) -> None:
    add_recipients(db, 1)
    add_recipients(db, 1, prefix="josé", domain="ayuntamiento.example")
    with RecordingSMTPServer(smtputf8=False) as server:
        send(db, smtp_settings(settings, server))
        accepted = {r for m in server.messages for r in m.recipients}
    row = deliveries(db)["josé00000@ayuntamiento.example"]
    assert row.status == "failed"
    assert "SMTPUTF8" in (row.smtp_reply or "")
    assert accepted == {"agente00000@policia.example"}


def test_unreachable_server_fails_the_run_before_touching_a_row(
    db: Database, settings: Settings
) -> None:
    from clara_mailer.core.errors import TransportError

    add_recipients(db, 3)
    with RecordingSMTPServer() as server:
        url = server.url()
    dead = Settings(**{**vars(settings), "smtp_url": url, "smtp_timeout": 2.0})  # type: ignore[arg-type]
    with pytest.raises(TransportError):
        send(db, dead)
    assert {d.status for d in deliveries(db).values()} == {"queued"}
    assert all(d.worker_id is None for d in deliveries(db).values())


def test_dry_run_renders_everything_and_writes_nothing(db: Database, settings: Settings) -> None:
    add_recipients(db, 12)
    result = Mailer(settings, database=db).dry_run(
        CAMPAIGN, SendOptions(segments=("local-police",))
    )
    assert result.rendered == Counter({"local-police": 12})
    assert result.largest > 1000
    assert deliveries(db) == {}
    assert not settings.outbox_dir.exists()


def test_dkim_signed_campaign_verifies_as_received(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    add_recipients(db, 3)
    with RecordingSMTPServer() as server:
        signed = smtp_settings(
            settings,
            server,
            dkim_domain="clara.example",
            dkim_selector="s1",
            dkim_key_file=key_file,
        )
        send(db, signed)
        received = [m.data for m in server.messages]
    assert len(received) == 3
    for data in received:
        assert data.startswith(b"DKIM-Signature:")
        signature = re.match(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", data, re.S)
        assert signature
        unfolded = re.sub(rb"\s+", b"", signature.group(1)).lower()
        signed_headers = re.search(rb";h=([^;]+)", unfolded)
        assert signed_headers and b"list-unsubscribe-post" in signed_headers.group(1).split(b":")
        assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record)
