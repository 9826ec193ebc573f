"""The ORM classes, mapped onto the Core tables of ``tables.py``.

``tables.py`` is the schema (columns, defaults, indexes); this module adds the typed
attributes and relationships the writing paths use. Times are naive UTC everywhere
(``utcnow()``). The ``deliveries`` row is the truth about a (campaign, recipient): see
ARCHITECTURE.md for the state machine.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import DeclarativeBase, Mapped, relationship

from clara_mailer.core.vocabulary import (
    BounceKind,
    CampaignKind,
    Language,
    OptOutReason,
    OptOutScope,
    RsvpAnswer,
    Status,
)
from clara_mailer.store import tables
from clara_mailer.store.tables import recipient_segments, utcnow

__all__ = [
    "AuditEntry",
    "Base",
    "Bounce",
    "Campaign",
    "Consent",
    "ConsentText",
    "Delivery",
    "Meta",
    "Recipient",
    "Rsvp",
    "Schedule",
    "Segment",
    "Suppression",
    "User",
    "recipient_segments",
    "utcnow",
]


class Base(DeclarativeBase):
    metadata = tables.metadata


class Segment(Base):
    __table__ = tables.segments

    id: Mapped[int]
    slug: Mapped[str]
    name: Mapped[str]
    created_at: Mapped[dt.datetime]

    recipients: Mapped[list[Recipient]] = relationship(
        secondary=recipient_segments, back_populates="segments"
    )


class Recipient(Base):
    __table__ = tables.recipients

    id: Mapped[int]
    email: Mapped[str]
    email_key: Mapped[str]
    name: Mapped[str]
    organisation: Mapped[str]
    language: Mapped[Language]
    country: Mapped[str]
    consent_basis: Mapped[str]
    consent_source: Mapped[str]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    segments: Mapped[list[Segment]] = relationship(
        secondary=recipient_segments, back_populates="recipients", order_by="Segment.slug"
    )


class Campaign(Base):
    __table__ = tables.campaigns

    id: Mapped[int]
    slug: Mapped[str]
    kind: Mapped[CampaignKind]
    template_hash: Mapped[str | None]
    created_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    rate_limit: Mapped[float | None]
    rate_cursor: Mapped[dt.datetime | None]


class Delivery(Base):
    __table__ = tables.deliveries

    id: Mapped[int]
    campaign_id: Mapped[int]
    recipient_id: Mapped[int | None]
    email: Mapped[str | None]
    segment: Mapped[str]
    language: Mapped[Language]
    status: Mapped[Status]
    attempts: Mapped[int]
    next_attempt_at: Mapped[dt.datetime | None]
    worker_id: Mapped[str | None]
    lease_expires_at: Mapped[dt.datetime | None]
    smtp_code: Mapped[int | None]
    smtp_reply: Mapped[str | None]
    message_id: Mapped[str | None]
    created_at: Mapped[dt.datetime]
    first_attempt_at: Mapped[dt.datetime | None]
    last_attempt_at: Mapped[dt.datetime | None]
    sent_at: Mapped[dt.datetime | None]

    campaign: Mapped[Campaign] = relationship()
    recipient: Mapped[Recipient | None] = relationship()


class Suppression(Base):
    """An opt-out, hard bounce, complaint or erasure, keyed by an HMAC of the address."""

    __table__ = tables.suppressions

    id: Mapped[int]
    address_hash: Mapped[str]
    scope: Mapped[OptOutScope]
    reason: Mapped[OptOutReason]
    source: Mapped[str]
    note: Mapped[str]
    campaign_id: Mapped[int | None]
    created_at: Mapped[dt.datetime]
    lifted_at: Mapped[dt.datetime | None]
    lifted_note: Mapped[str | None]


class Bounce(Base):
    __table__ = tables.bounces

    id: Mapped[int]
    message_key: Mapped[str]
    delivery_id: Mapped[int | None]
    campaign_id: Mapped[int | None]
    address_hash: Mapped[str | None]
    kind: Mapped[BounceKind]
    status_code: Mapped[str]
    action: Mapped[str]
    diagnostic: Mapped[str]
    received_at: Mapped[dt.datetime]


class Rsvp(Base):
    __table__ = tables.rsvps

    id: Mapped[int]
    campaign_id: Mapped[int]
    recipient_id: Mapped[int]
    answer: Mapped[RsvpAnswer]
    answered_at: Mapped[dt.datetime]


class Meta(Base):
    """Small key/value store: the generated secret key lives here."""

    __table__ = tables.meta

    key: Mapped[str]
    value: Mapped[str]


class User(Base):
    """Someone who may log in to the dashboard (``clara-mail users add``)."""

    __table__ = tables.users

    id: Mapped[int]
    name: Mapped[str]
    password_hash: Mapped[str]
    created_at: Mapped[dt.datetime]
    sessions_valid_after: Mapped[dt.datetime | None]


class AuditEntry(Base):
    """One action of a dashboard user or of an account command: who, what, when."""

    __table__ = tables.audit

    id: Mapped[int]
    at: Mapped[dt.datetime]
    who: Mapped[str]
    what: Mapped[str]
    detail: Mapped[str]


class ConsentText(Base):
    """A consent text exactly as a subscribe form showed it, stored once by its SHA-256."""

    __table__ = tables.consent_texts

    sha256: Mapped[str]
    language: Mapped[str]
    text: Mapped[str]
    created_at: Mapped[dt.datetime]


class Consent(Base):
    """Proof of one confirmed subscription (double opt-in): what was shown and when."""

    __table__ = tables.consents

    id: Mapped[int]
    recipient_id: Mapped[int]
    text_sha256: Mapped[str]
    language: Mapped[str]
    source: Mapped[str]
    segments: Mapped[str]
    given_at: Mapped[dt.datetime]
    confirmed_at: Mapped[dt.datetime]
    token_id: Mapped[str]
    note: Mapped[str]


class Schedule(Base):
    """A send recorded for later (``send --at``); a runner claims it once (state)."""

    __table__ = tables.schedules

    id: Mapped[int]
    campaign: Mapped[str]
    options: Mapped[str]
    due_at: Mapped[dt.datetime]
    state: Mapped[str]
    claimed_by: Mapped[str | None]
    claimed_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    result: Mapped[str]
    created_at: Mapped[dt.datetime]
