"""Rows and mailboxes for the bounce tests: the campaign the sample bounces answer."""

from __future__ import annotations

import mailbox
from pathlib import Path

from sqlalchemy import select

from clara_mailer.core.vocabulary import Status
from clara_mailer.deliverylog.figures import recount_segments
from clara_mailer.store.database import Database
from clara_mailer.store.models import Bounce, Campaign, Delivery, Recipient, Suppression

SAMPLES = Path(__file__).parent / "bounce_samples"

# id -> address; the samples' VERP tokens were signed with conftest's TEST_SECRET for
# (campaign 1, recipient id), and their returned Message-IDs are the ones below.
RECIPIENTS = {
    1: "lost.user@policia-local.example",  # postfix-5.1.1: VERP, hard
    2: "buzon.lleno@asociacion.example",  # exim-5.2.2: VERP, soft
    3: "nobody@oberaxe.example",  # office365-5.1.10: VERP, hard
    4: "gone.away@gmail.example",  # gmail-5.1.1: Message-ID, hard
    5: "ex.concejal@ayuntamiento.example",  # exim-plain: Message-ID (campaign 2), soft
    6: "policia@fuenlabrada.example",  # postfix-delayed: VERP, delayed
    7: "prensa@getafe.example",  # postfix-5.7.1-policy: VERP, policy
    8: "maria.ibanez@pamplona.example",  # out-of-office-es: auto-reply
    9: "archivo@leganes.example",  # exchange-4.4.7-expired: VERP, soft (Action: failed)
    10: "vecino@ayto-elche.example",  # qmail: by address, hard
}


def seed(db: Database) -> None:
    """Two sent campaigns; every delivery ``sent`` with its Message-ID."""
    with db.session() as s:
        s.add_all(
            [
                Campaign(id=1, slug="newsletter-2022-01", kind="newsletter"),
                Campaign(id=2, slug="invitation-2022-02", kind="invitation"),
            ]
        )
        s.add_all(
            Recipient(id=rid, email=email, email_key=email) for rid, email in RECIPIENTS.items()
        )
        s.flush()
        for rid, email in RECIPIENTS.items():
            campaign_id = 2 if rid == 5 else 1
            s.add(
                Delivery(
                    id=rid,
                    campaign_id=campaign_id,
                    recipient_id=rid,
                    email=email,
                    status=Status.SENT.value,
                    smtp_code=250,
                    smtp_reply="2.0.0 Ok: queued",
                    message_id=f"<{'invitation-2022' if rid == 5 else 'newsletter-2022-01'}.r{rid}@clara.example>",
                )
            )
        s.flush()
        for campaign_id in (1, 2):  # rows written here, not by the plan
            recount_segments(s.connection(), campaign_id)


def write_mbox(path: Path, messages: list[bytes]) -> Path:
    box = mailbox.mbox(path, create=True)
    try:
        for raw in messages:
            box.add(raw)
        box.flush()
    finally:
        box.close()
    return path


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def all_samples() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SAMPLES.iterdir()) if p.is_file()]


def delivery_status(db: Database) -> dict[int, str]:
    with db.session() as s:
        return {d.id: d.status for d in s.scalars(select(Delivery))}


def suppression_reasons(db: Database) -> list[str]:
    with db.session() as s:
        return sorted(s.scalars(select(Suppression.reason)))


def bounce_rows(db: Database) -> list[tuple[str, int | None, str, str]]:
    with db.session() as s:
        return sorted(
            (b.message_key, b.delivery_id, b.kind, b.status_code) for b in s.scalars(select(Bounce))
        )
