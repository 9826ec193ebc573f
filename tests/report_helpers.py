"""A delivery log built the real way for the report tests: a send through aiosmtpd with
refusals (550/553) and deferrals (451), DSN bounces read from an mbox by bounces.py, and
opt-outs recorded as the unsubscribe page records them."""

from __future__ import annotations

import datetime as dt
import mailbox
from collections import Counter
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path

from sqlalchemy import select, update

from clara_mailer.bounces.mailboxes import BounceSource
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.optouts import suppressions
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Delivery, Recipient, Rsvp
from tests.send_helpers import add_recipients
from tests.smtp_server import Faults, RecordingSMTPServer

NEWSLETTER = "newsletter-2022-01"
INVITATION = "conference-2022-02-04"
FORMULA_ORG = '=HYPERLINK("http://evil.example","x")'


@dataclass
class BuiltLog:
    """What the scenario did, to check every report format against."""

    addresses: dict[str, list[str]]  # segment -> addresses
    refused: dict[str, tuple[int, str]]  # address -> (code, reply) the server gave
    deferred: dict[str, tuple[int, str]]
    skipped: list[str]
    hard_bounced: list[str]
    policy_bounced: list[str]
    optouts_active: int
    optouts_lifted: int
    accepted: Counter[str] = field(default_factory=Counter)  # address -> times accepted

    def segment_of(self, address: str) -> str:
        return next(seg for seg, members in self.addresses.items() if address in members)

    def expected_status(self, address: str) -> str:
        if address in self.skipped:
            return "skipped"
        if address in self.refused:
            return "failed"
        if address in self.deferred:
            return "deferred"
        if address in self.hard_bounced or address in self.policy_bounced:
            return "bounced"
        return "sent"

    def expected_segments(self) -> dict[str, Counter[str]]:
        return {
            seg: Counter(self.expected_status(a) for a in members)
            for seg, members in self.addresses.items()
        }


def smtp_settings(settings: Settings, server: RecordingSMTPServer) -> Settings:
    values = {**vars(settings), "smtp_url": server.url(), "retry_in_run": "0.1"}
    return Settings(**values)  # type: ignore[arg-type]


def send(db: Database, settings: Settings, slug: str, segments: tuple[str, ...]) -> None:
    options = SendOptions(segments=segments, concurrency=2)
    plan = Mailer(settings, database=db).plan(slug, options)
    Mailer(settings, database=db).send(plan, options, handle_signals=False)


def dsn(message_id: str, address: str, status: str, diagnostic: str) -> bytes:
    """An RFC 3464 delivery status notification about the message ``message_id``."""
    date = format_datetime(dt.datetime.now(dt.UTC))
    text = f"""From: MAILER-DAEMON@mx.receiver.example
To: bounces@clara.example
Subject: Undelivered Mail Returned to Sender
Date: {date}
Message-ID: <dsn-{status}-{address}>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b1"

--b1
Content-Type: text/plain; charset=us-ascii

Your message to {address} could not be delivered.

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.example

Final-Recipient: rfc822; {address}
Action: failed
Status: {status}
Diagnostic-Code: smtp; {diagnostic}

--b1
Content-Type: text/rfc822-headers

Message-ID: {message_id}
From: boletin@clara.example
To: {address}

--b1--
"""
    return text.replace("\n", "\r\n").encode()


def build_newsletter_log(db: Database, settings: Settings, tmp_path: Path) -> BuiltLog:
    police = add_recipients(db, 24, "local-police")
    assoc = add_recipients(
        db, 8, "associations", prefix="entidad", domain="asociacion.example", start=100
    )
    with db.session() as s:  # one organisation a spreadsheet would run as a formula
        s.execute(
            update(Recipient).where(Recipient.email == assoc[0]).values(organisation=FORMULA_ORG)
        )
    signer = TokenSigner(db.secret_key(settings))
    skipped = police[:2]
    with db.session() as s:
        for address in skipped:
            suppressions.suppress(s, signer, address, reason="manual", source="test")
    refused = {
        police[2]: (550, f"5.1.1 <{police[2]}>: Recipient address rejected: User unknown"),
        police[3]: (550, f"5.1.1 <{police[3]}>: Recipient address rejected: User unknown"),
        police[4]: (550, f"5.1.1 <{police[4]}>: Recipient address rejected: User unknown"),
        assoc[1]: (553, "5.1.3 Bad destination mailbox address syntax"),
    }
    deferred = {
        police[5]: (451, "4.3.0 Mailbox temporarily unavailable"),
        assoc[2]: (451, "4.3.0 Mailbox temporarily unavailable"),
    }
    faults = Faults(replies={**refused, **deferred})
    with RecordingSMTPServer(faults=faults) as server:
        send(db, smtp_settings(settings, server), NEWSLETTER, ("local-police", "associations"))
        accepted = Counter(r for m in server.messages for r in m.recipients)

    with db.session() as s:
        message_ids = dict(s.execute(select(Delivery.email, Delivery.message_id)).all())
        campaign_id = s.scalar(select(Campaign.id).where(Campaign.slug == NEWSLETTER))
    hard, policy = [police[6], assoc[3]], [police[7]]
    messages = [dsn(message_ids[a], a, "5.1.1", "550 5.1.1 user unknown") for a in hard] + [
        dsn(message_ids[a], a, "5.7.1", "550 5.7.1 rejected by DMARC policy") for a in policy
    ]
    box = mailbox.mbox(tmp_path / "bounces.mbox", create=True)
    for raw in messages:
        box.add(raw)
    box.flush()
    box.close()
    Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(tmp_path / "bounces.mbox"))
    )

    # Two people unsubscribe through the message's link (as web.py records it); one of
    # them undoes it. A third opted out by hand, with no campaign: not this campaign's.
    with db.session() as s:
        for address in (police[10], police[11]):
            suppressions.suppress(
                s, signer, address, reason="one-click", source=NEWSLETTER, campaign_id=campaign_id
            )
        suppressions.suppress(s, signer, police[12], reason="manual", source="cli")
    with db.session() as s:
        suppressions.lift(s, signer, police[11], note="undone on the page")

    return BuiltLog(
        addresses={"local-police": police, "associations": assoc},
        refused=refused,
        deferred=deferred,
        skipped=skipped,
        hard_bounced=hard,
        policy_bounced=policy,
        optouts_active=1,
        optouts_lifted=1,
        accepted=accepted,
    )


def build_invitation_log(db: Database, settings: Settings) -> list[str]:
    """An invitation sent to 5 people; 2 answer yes, 1 no. Returns the addresses."""
    addresses = add_recipients(
        db, 5, "national-authorities", prefix="ministerio", domain="gob.example", start=500
    )
    with RecordingSMTPServer() as server:
        send(db, smtp_settings(settings, server), INVITATION, ("national-authorities",))
    with db.session() as s:
        campaign_id = s.scalar(select(Campaign.id).where(Campaign.slug == INVITATION))
        ids = dict(s.execute(select(Recipient.email, Recipient.id)).all())
        assert campaign_id is not None
        for address, answer in zip(addresses[:3], ("yes", "yes", "no"), strict=True):
            s.add(Rsvp(campaign_id=campaign_id, recipient_id=ids[address], answer=answer))
    return addresses
