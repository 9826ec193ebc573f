"""The database tables as SQLAlchemy Core ``Table`` objects: the schema, with no ORM.

Reading paths that need no objects (the report, the dashboard's figures) use these
tables alone and never import ``sqlalchemy.orm`` (about 0.1 s and 5 MB a command);
``models.py`` maps the ORM classes onto the same tables. Times are naive UTC everywhere
(``utcnow()``), the same on SQLite and PostgreSQL. The ``deliveries`` row is the truth
about a (campaign, recipient): see ARCHITECTURE.md for the state machine.
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
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SqlEnum

from clara_mailer.core.vocabulary import (
    PROBLEM_STATUSES,
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


metadata = MetaData()

#: The conditions of the partial indexes on ``deliveries``, as SQL text: a query uses such
#: an index only when its WHERE has the same term, literally (a bound parameter in its
#: place hides it from SQLite's planner). Built from the vocabulary; a test keeps them
#: equal to migration 0005's.
UNSENT = f"status <> '{Status.SENT.value}'"
PROBLEMS = "status IN ({})".format(", ".join(f"'{s.value}'" for s in PROBLEM_STATUSES))


def _id() -> Column[int]:
    return Column("id", Integer, primary_key=True)


def _created() -> Column[dt.datetime]:
    return Column("created_at", DateTime, nullable=False, default=utcnow)


segments = Table(
    "segments",
    metadata,
    _id(),
    Column("slug", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    _created(),
)

recipients = Table(
    "recipients",
    metadata,
    _id(),
    Column("email", String(320), nullable=False),
    # Case-folded normalised address: the identity used for de-duplication.
    Column("email_key", String(320), nullable=False, unique=True),
    Column("name", Text, nullable=False, default=""),
    Column("organisation", Text, nullable=False, default=""),
    Column("language", _words(Language, 2), nullable=False, default=Language.ES),
    Column("country", String(2), nullable=False, default=""),
    Column("consent_basis", String(64), nullable=False, default="legitimate-interest"),
    Column("consent_source", Text, nullable=False, default=""),
    _created(),
    Column("updated_at", DateTime, nullable=False, default=utcnow, onupdate=utcnow),
)

recipient_segments = Table(
    "recipient_segments",
    metadata,
    Column("recipient_id", ForeignKey("recipients.id", ondelete="CASCADE"), primary_key=True),
    Column("segment_id", ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_recipient_segments_segment", "segment_id", "recipient_id"),
)

campaigns = Table(
    "campaigns",
    metadata,
    _id(),
    Column("slug", String(100), nullable=False, unique=True),
    Column("kind", _words(CampaignKind, 16), nullable=False),
    # Hash of the template files when the first message went out: a resume with
    # changed templates is refused unless asked for.
    Column("template_hash", String(64)),
    _created(),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    # Campaign-wide rate limit shared by every worker (messages per second) and the
    # time before which the next claimed batch may not start (a token bucket in the row).
    Column("rate_limit", Float),
    Column("rate_cursor", DateTime),
)

deliveries = Table(
    "deliveries",
    metadata,
    _id(),
    Column("campaign_id", ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    # NULL once the recipient has been erased (GDPR): the row stays for the figures.
    Column("recipient_id", ForeignKey("recipients.id", ondelete="SET NULL")),
    Column("email", String(320)),
    Column("segment", String(64), nullable=False, default=""),
    Column("language", _words(Language, 2), nullable=False, default=Language.ES),
    Column("status", _words(Status, 12), nullable=False, default=Status.QUEUED),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime),
    Column("worker_id", String(64)),
    Column("lease_expires_at", DateTime),
    Column("smtp_code", Integer),
    Column("smtp_reply", Text),
    Column("message_id", String(200)),
    _created(),
    Column("first_attempt_at", DateTime),
    Column("last_attempt_at", DateTime),
    Column("sent_at", DateTime),
    UniqueConstraint("campaign_id", "recipient_id", name="uq_deliveries_campaign_recipient"),
    Index("ix_deliveries_claim", "campaign_id", "status", "next_attempt_at"),
    Index("ix_deliveries_segment", "campaign_id", "segment", "id"),
    Index("ix_deliveries_recipient", "recipient_id"),
    # And the partial indexes (``declare_partial_indexes``): ix_deliveries_unsent,
    # ix_deliveries_problems, and ix_deliveries_lease, ix_deliveries_sent and
    # ix_deliveries_message_id (bounces without a VERP token are matched by the
    # Message-ID they return) only where their column is set.
)

# An opt-out, hard bounce, complaint or erasure, keyed by an HMAC of the address.
suppressions = Table(
    "suppressions",
    metadata,
    _id(),
    Column("address_hash", String(64), nullable=False),
    Column("scope", _words(OptOutScope, 16), nullable=False, default=OptOutScope.ALL),
    Column("reason", _words(OptOutReason, 32), nullable=False),
    Column("source", String(200), nullable=False, default=""),
    Column("note", Text, nullable=False, default=""),
    Column("campaign_id", ForeignKey("campaigns.id", ondelete="SET NULL")),
    _created(),
    Column("lifted_at", DateTime),
    Column("lifted_note", Text),
    Index("ix_suppressions_hash", "address_hash", "lifted_at"),
)

bounces = Table(
    "bounces",
    metadata,
    _id(),
    # Message-ID of the bounce itself, or a hash of its content: reading twice is a no-op.
    Column("message_key", String(200), nullable=False, unique=True),
    Column("delivery_id", ForeignKey("deliveries.id", ondelete="SET NULL"), index=True),
    Column("campaign_id", ForeignKey("campaigns.id", ondelete="SET NULL"), index=True),
    Column("address_hash", String(64)),
    Column("kind", _words(BounceKind, 16), nullable=False),
    Column("status_code", String(16), nullable=False, default=""),
    Column("action", String(16), nullable=False, default=""),
    Column("diagnostic", Text, nullable=False, default=""),
    Column("received_at", DateTime, nullable=False, default=utcnow),
    Index("ix_bounces_hash_time", "address_hash", "received_at"),
)

rsvps = Table(
    "rsvps",
    metadata,
    _id(),
    Column("campaign_id", ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    Column("recipient_id", ForeignKey("recipients.id", ondelete="CASCADE"), nullable=False),
    Column("answer", _words(RsvpAnswer, 8), nullable=False),
    Column("answered_at", DateTime, nullable=False, default=utcnow),
    UniqueConstraint("campaign_id", "recipient_id", name="uq_rsvps"),
)

# Small key/value store: the generated secret key lives here.
meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Someone who may log in to the dashboard (``clara-mail users add``).
users = Table(
    "users",
    metadata,
    _id(),
    Column("name", String(64), nullable=False, unique=True),
    # argon2id, in the PHC string format ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    Column("password_hash", String(200), nullable=False),
    _created(),
    # Sessions issued before this time are no longer valid (set by logging out).
    Column("sessions_valid_after", DateTime),
)

# One action of a dashboard user or of an account command: who, what, when.
audit = Table(
    "audit",
    metadata,
    _id(),
    Column("at", DateTime, nullable=False, default=utcnow),
    Column("who", String(200), nullable=False),
    Column("what", String(64), nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_audit_at", "at"),
)

# A consent text exactly as a subscribe form showed it, stored once by its SHA-256.
consent_texts = Table(
    "consent_texts",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("language", String(2), nullable=False),
    Column("text", Text, nullable=False),
    _created(),
)

# Proof of one confirmed subscription (double opt-in): what was shown and when.
consents = Table(
    "consents",
    metadata,
    _id(),
    # Erasure deletes the recipient, and with it this record.
    Column("recipient_id", ForeignKey("recipients.id", ondelete="CASCADE"), nullable=False),
    Column("text_sha256", ForeignKey("consent_texts.sha256"), nullable=False),
    Column("language", String(2), nullable=False),
    Column("source", String(64), nullable=False),
    Column("segments", Text, nullable=False, default=""),
    # When the form was sent (the consent given) and when the emailed link confirmed it.
    Column("given_at", DateTime, nullable=False),
    Column("confirmed_at", DateTime, nullable=False, default=utcnow),
    # The confirmation link's own id: a link confirms once.
    Column("token_id", String(32), nullable=False, unique=True),
    Column("note", Text, nullable=False, default=""),
    Index("ix_consents_recipient", "recipient_id"),
)

# A send recorded for later (``send --at``); a runner claims it once (state).
schedules = Table(
    "schedules",
    metadata,
    _id(),
    Column("campaign", String(100), nullable=False),
    # The send's options (segments, filters, limit, rate...) as JSON.
    Column("options", Text, nullable=False, default="{}"),
    Column("due_at", DateTime, nullable=False),
    # due -> running -> done | failed; due -> cancelled.
    Column("state", String(16), nullable=False, default="due"),
    Column("claimed_by", String(200)),
    Column("claimed_at", DateTime),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("result", Text, nullable=False, default=""),
    _created(),
    Index("ix_schedules_state_due", "state", "due_at"),
)

# How many deliveries each (campaign, segment) has: written by the delivery log's plan
# in the transaction that inserts them (migration 0005). Status changes do not touch it.
campaign_segments = Table(
    "campaign_segments",
    metadata,
    Column(
        "campaign_id",
        ForeignKey("campaigns.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("segment", String(64), primary_key=True),
    Column("deliveries", Integer, nullable=False),
)


#: Indexes of ``deliveries`` only where their last column is set (migration 0006): each
#: state change writes a new row version with an entry in every index it belongs to, and
#: no query looks for a NULL in these columns. A test keeps them equal to 0006's.
SET_ONLY = {
    "ix_deliveries_lease": ("status", "lease_expires_at"),
    "ix_deliveries_sent": ("campaign_id", "sent_at"),
    "ix_deliveries_message_id": ("message_id",),
}


def declare_partial_indexes() -> None:
    """Add the partial indexes of ``deliveries`` (migrations 0005, 0006) to the metadata.

    They are not declared with the table because ``sqlite_where`` and
    ``postgresql_where`` make SQLAlchemy import both dialects (~60 ms and ~3 MB, for
    every command): the database has them, and what compares the metadata with the
    database (Alembic's environment, the schema test) calls this first."""
    if any(index.name == "ix_deliveries_unsent" for index in deliveries.indexes):
        return
    for name, columns, where in (
        ("ix_deliveries_unsent", ("campaign_id", "segment", "status"), UNSENT),
        (
            "ix_deliveries_problems",
            ("campaign_id", "status", "smtp_code", "smtp_reply", "segment"),
            PROBLEMS,
        ),
        *((name, columns, f"{columns[-1]} IS NOT NULL") for name, columns in SET_ONLY.items()),
    ):
        Index(
            name,
            *(deliveries.c[column] for column in columns),
            sqlite_where=text(where),
            postgresql_where=text(where),
        )
