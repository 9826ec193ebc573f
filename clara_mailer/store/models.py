"""The database tables, as typed SQLAlchemy 2 models.

Times are naive UTC everywhere (``utcnow()``), the same on SQLite and PostgreSQL.
The ``deliveries`` row is the truth about a (campaign, recipient): every resume,
retry and report reads it. See ARCHITECTURE.md for the state machine.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from clara_mailer.core.vocabulary import (
    BounceKind,
    CampaignKind,
    Language,
    OptOutReason,
    OptOutScope,
    RsvpAnswer,
    Status,
)


def _words(enum: type[Any], length: int) -> SqlEnum:
    """A column holding one of ``enum``'s values as plain text (no database enum type, no
    CHECK constraint: a new word needs no migration), read back as the enum."""
    return SqlEnum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda e: [m.value for m in e],
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


recipient_segments = Table(
    "recipient_segments",
    Base.metadata,
    Column("recipient_id", ForeignKey("recipients.id", ondelete="CASCADE"), primary_key=True),
    Column("segment_id", ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_recipient_segments_segment", "segment_id", "recipient_id"),
)


class Segment(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    recipients: Mapped[list[Recipient]] = relationship(
        secondary=recipient_segments, back_populates="segments"
    )


class Recipient(Base):
    __tablename__ = "recipients"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    # Case-folded normalised address: the identity used for de-duplication.
    email_key: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(Text, default="")
    organisation: Mapped[str] = mapped_column(Text, default="")
    language: Mapped[Language] = mapped_column(_words(Language, 2), default=Language.ES)
    country: Mapped[str] = mapped_column(String(2), default="")
    consent_basis: Mapped[str] = mapped_column(String(64), default="legitimate-interest")
    consent_source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    segments: Mapped[list[Segment]] = relationship(
        secondary=recipient_segments, back_populates="recipients", order_by="Segment.slug"
    )


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[CampaignKind] = mapped_column(_words(CampaignKind, 16))
    # Hash of the template files when the first message went out: a resume with
    # changed templates is refused unless asked for.
    template_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # Campaign-wide rate limit shared by every worker (messages per second) and the
    # time before which the next claimed batch may not start (a token bucket in the row).
    rate_limit: Mapped[float | None] = mapped_column(Float)
    rate_cursor: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("campaign_id", "recipient_id", name="uq_deliveries_campaign_recipient"),
        Index("ix_deliveries_claim", "campaign_id", "status", "next_attempt_at"),
        Index("ix_deliveries_lease", "status", "lease_expires_at"),
        Index("ix_deliveries_segment", "campaign_id", "segment", "status"),
        Index("ix_deliveries_sent", "campaign_id", "sent_at"),
        Index("ix_deliveries_recipient", "recipient_id"),
        # Bounces without a VERP token are matched by the Message-ID they return.
        Index("ix_deliveries_message_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    # NULL once the recipient has been erased (GDPR): the row stays for the figures.
    recipient_id: Mapped[int | None] = mapped_column(
        ForeignKey("recipients.id", ondelete="SET NULL")
    )
    email: Mapped[str | None] = mapped_column(String(320))
    segment: Mapped[str] = mapped_column(String(64), default="")
    language: Mapped[Language] = mapped_column(_words(Language, 2), default=Language.ES)
    status: Mapped[Status] = mapped_column(_words(Status, 12), default=Status.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    smtp_code: Mapped[int | None] = mapped_column(Integer)
    smtp_reply: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    first_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    campaign: Mapped[Campaign] = relationship()
    recipient: Mapped[Recipient | None] = relationship()


class Suppression(Base):
    """An opt-out, hard bounce, complaint or erasure, keyed by an HMAC of the address."""

    __tablename__ = "suppressions"
    __table_args__ = (Index("ix_suppressions_hash", "address_hash", "lifted_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    address_hash: Mapped[str] = mapped_column(String(64))
    scope: Mapped[OptOutScope] = mapped_column(_words(OptOutScope, 16), default=OptOutScope.ALL)
    reason: Mapped[OptOutReason] = mapped_column(_words(OptOutReason, 32))
    source: Mapped[str] = mapped_column(String(200), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lifted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    lifted_note: Mapped[str | None] = mapped_column(Text)


class Bounce(Base):
    __tablename__ = "bounces"
    __table_args__ = (Index("ix_bounces_hash_time", "address_hash", "received_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # Message-ID of the bounce itself, or a hash of its content: reading twice is a no-op.
    message_key: Mapped[str] = mapped_column(String(200), unique=True)
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="SET NULL"), index=True
    )
    campaign_id: Mapped[int | None] = mapped_column(
        ForeignKey("campaigns.id", ondelete="SET NULL"), index=True
    )
    address_hash: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[BounceKind] = mapped_column(_words(BounceKind, 16))
    status_code: Mapped[str] = mapped_column(String(16), default="")
    action: Mapped[str] = mapped_column(String(16), default="")
    diagnostic: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Rsvp(Base):
    __tablename__ = "rsvps"
    __table_args__ = (UniqueConstraint("campaign_id", "recipient_id", name="uq_rsvps"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    recipient_id: Mapped[int] = mapped_column(ForeignKey("recipients.id", ondelete="CASCADE"))
    answer: Mapped[RsvpAnswer] = mapped_column(_words(RsvpAnswer, 8))
    answered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Meta(Base):
    """Small key/value store: the generated secret key lives here."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    """Someone who may log in to the dashboard (``clara-mail users add``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # argon2id, in the PHC string format ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # Sessions issued before this time are no longer valid (set by logging out).
    sessions_valid_after: Mapped[dt.datetime | None] = mapped_column(DateTime)


class AuditEntry(Base):
    """One action of a dashboard user or of an account command: who, what, when."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_at", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    who: Mapped[str] = mapped_column(String(200))
    what: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")


class ConsentText(Base):
    """A consent text exactly as a subscribe form showed it, stored once by its SHA-256."""

    __tablename__ = "consent_texts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    language: Mapped[str] = mapped_column(String(2))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Consent(Base):
    """Proof of one confirmed subscription (double opt-in): what was shown and when."""

    __tablename__ = "consents"
    __table_args__ = (Index("ix_consents_recipient", "recipient_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # Erasure deletes the recipient, and with it this record.
    recipient_id: Mapped[int] = mapped_column(ForeignKey("recipients.id", ondelete="CASCADE"))
    text_sha256: Mapped[str] = mapped_column(ForeignKey("consent_texts.sha256"))
    language: Mapped[str] = mapped_column(String(2))
    source: Mapped[str] = mapped_column(String(64))
    segments: Mapped[str] = mapped_column(Text, default="")
    # When the form was sent (the consent given) and when the emailed link confirmed it.
    given_at: Mapped[dt.datetime] = mapped_column(DateTime)
    confirmed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # The confirmation link's own id: a link confirms once.
    token_id: Mapped[str] = mapped_column(String(32), unique=True)
    note: Mapped[str] = mapped_column(Text, default="")


class Schedule(Base):
    """A send recorded for later (``send --at``); a runner claims it once (state)."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_state_due", "state", "due_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign: Mapped[str] = mapped_column(String(100))
    # The send's options (segments, filters, limit, rate...) as JSON.
    options: Mapped[str] = mapped_column(Text, default="{}")
    due_at: Mapped[dt.datetime] = mapped_column(DateTime)
    # due -> running -> done | failed; due -> cancelled.
    state: Mapped[str] = mapped_column(String(16), default="due")
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    result: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
