"""Test data for the opt-out, privacy and web tests: real rows in the real database.

Two campaigns (a newsletter and an invitation), three recipients in segments, a
delivery per campaign and recipient (one with an SMTP reply and a bounce that quote the
address, as real servers do), and one RSVP.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from clara_mailer.core.tokens import TokenSigner
from clara_mailer.deliverylog.figures import recount_segments
from clara_mailer.store.database import Database
from clara_mailer.store.models import Bounce, Campaign, Delivery, Recipient, Rsvp, Segment, utcnow

ANA = "Ana.Perez@policia-getafe.example"
JOHN = "john.smith@oberaxe.example"
ZOE = "zoe@asociacion-madrid.example"


@dataclass(frozen=True)
class Seeded:
    newsletter_id: int
    invitation_id: int
    ana_id: int
    john_id: int
    zoe_id: int


def seed(db: Database, signer: TokenSigner) -> Seeded:
    with db.session() as s:
        # The first migration creates the standard segments.
        police = s.scalars(select(Segment).where(Segment.slug == "local-police")).one()
        national = s.scalars(select(Segment).where(Segment.slug == "national-authorities")).one()
        ana = Recipient(
            email=ANA,
            email_key=ANA.casefold(),
            name="Ana Pérez Núñez",
            organisation="Policía Local de Getafe",
            language="es",
            country="ES",
            consent_basis="legitimate-interest",
            consent_source="CLARA partner list 2021",
            segments=[police, national],
        )
        john = Recipient(
            email=JOHN,
            email_key=JOHN.casefold(),
            name="John Smith",
            organisation="OBERAXE",
            language="en",
            country="GB",
            consent_source="conference sign-up sheet",
            segments=[national],
        )
        zoe = Recipient(
            email=ZOE,
            email_key=ZOE.casefold(),
            name="Zoë Martín",
            organisation="Asociación Madrid",
            language="es",
            segments=[],
        )
        newsletter = Campaign(slug="newsletter-2022-01", kind="newsletter")
        invitation = Campaign(slug="final-conference", kind="invitation")
        s.add_all([ana, john, zoe, newsletter, invitation])
        s.flush()
        now = utcnow()
        for campaign in (newsletter, invitation):
            for person in (ana, john, zoe):
                s.add(
                    Delivery(
                        campaign_id=campaign.id,
                        recipient_id=person.id,
                        email=person.email,
                        segment="local-police",
                        language=person.language,
                        status="sent",
                        attempts=1,
                        smtp_code=250,
                        smtp_reply=f"2.0.0 Ok: queued for <{person.email}>",
                        message_id=f"<{signer.message_id_part(campaign.slug, person.id)}@clara.example>",
                        sent_at=now,
                    )
                )
        s.flush()
        for campaign in (newsletter, invitation):  # rows written here, not by the plan
            recount_segments(s.connection(), campaign.id)
        ana_delivery = s.query(Delivery).filter_by(campaign_id=newsletter.id, recipient_id=ana.id)
        s.add(
            Bounce(
                message_key="<bounce-1@mx.policia-getafe.example>",
                delivery_id=ana_delivery.one().id,
                campaign_id=newsletter.id,
                address_hash=signer.address_hash(ANA),
                kind="soft",
                status_code="4.2.2",
                action="delayed",
                diagnostic=f"452 4.2.2 <{ANA.lower()}>: mailbox full",
            )
        )
        s.add(Rsvp(campaign_id=invitation.id, recipient_id=ana.id, answer="yes"))
        return Seeded(newsletter.id, invitation.id, ana.id, john.id, zoe.id)
