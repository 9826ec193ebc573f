"""A genuine Postfix bounce, produced in the test run and imported.

A private Postfix instance (tests/postfix_mta.py) relays one message to an aiosmtpd server
that refuses the recipient with 550 5.1.1; Postfix's bounce daemon returns a real DSN to
the VERP envelope sender, which the same server records. Skips only without Postfix/root.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clara_mailer.bounces.mailboxes import BounceSource
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner, verp_address
from clara_mailer.core.vocabulary import Status
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery, Recipient
from tests.bounces_helpers import bounce_rows, seed, suppression_reasons, write_mbox
from tests.postfix_mta import PostfixInstance, postfix_available
from tests.smtp_server import Faults, RecordingSMTPServer

pytestmark = pytest.mark.skipif(postfix_available() is not None, reason=str(postfix_available()))

GHOST = "ghost@lists.example"


def _genuine_postfix_bounce(sender: str) -> bytes:
    refuse = {GHOST: (550, f"5.1.1 <{GHOST}>: Recipient address rejected: User unknown")}
    relay = RecordingSMTPServer(faults=Faults(replies=refuse))
    with relay, PostfixInstance(relay.port) as mta:
        mta.sendmail(
            sender,
            GHOST,
            b"From: Proyecto CLARA <clara@clara.example>\n"
            b"To: " + GHOST.encode() + b"\n"
            b"Subject: Resultados del proyecto CLARA\n"
            b"Message-ID: <newsletter-2022-01.r11@clara.example>\n\nHola.\n",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            bounces = [m for m in relay.messages if m.mail_from in ("", "<>")]
            if bounces:
                assert bounces[0].recipients == [sender]
                return bounces[0].data
            time.sleep(0.1)
        raise AssertionError(f"Postfix sent no bounce; its log:\n{mta.log()}")


def test_genuine_postfix_bounce(db: Database, settings: Settings, tmp_path: Path) -> None:
    seed(db)
    with db.session() as s:
        s.add(Recipient(id=11, email=GHOST, email_key=GHOST))
        s.flush()
        s.add(
            Delivery(
                id=11, campaign_id=1, recipient_id=11, email=GHOST, status=Status.SENT.value,
                smtp_code=250, message_id="<newsletter-2022-01.r11@clara.example>",
            )
        )  # fmt: skip
    signer = TokenSigner(settings.secret_key or "")
    sender = verp_address("bounces@clara.example", signer.sign("b", 1, 11))

    raw = _genuine_postfix_bounce(sender)

    assert (
        b"report-type=delivery-status" in raw and b"Reporting-MTA: dns; mail.clara.example" in raw
    )
    mbox = write_mbox(tmp_path / "postfix.mbox", [raw])
    report = Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(mbox)))
    assert (report.hard, report.matched_by, report.suppressed) == (1, {"verp": 1}, 1)
    with db.session() as s:
        delivery = s.get(Delivery, 11)
        assert delivery is not None and delivery.status == "bounced"
        assert delivery.smtp_code == 550
        assert (delivery.smtp_reply or "").startswith(
            "bounce 5.1.1 550 5.1.1 <ghost@lists.example>"
        )
    assert suppression_reasons(db) == ["hard-bounce"]
    assert [(r[1], r[2], r[3]) for r in bounce_rows(db)] == [(11, "hard", "5.1.1")]
