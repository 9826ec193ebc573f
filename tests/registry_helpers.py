"""Helpers for the registry and import tests: writing input files, reading the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from clara_mailer.store.database import Database
from clara_mailer.store.models import Recipient, Segment, recipient_segments


def write(
    directory: Path, name: str, text: str, *, encoding: str = "utf-8", newline: str = "\n"
) -> Path:
    """Write ``text`` (lines joined by ``\\n``) with the given encoding and line ending."""
    path = directory / name
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def registry_state(db: Database) -> dict[str, Any]:
    """Everything import can change, comparable before and after."""
    with db.session() as s:
        recipients = sorted(
            tuple(r)
            for r in s.execute(
                select(
                    Recipient.email_key,
                    Recipient.email,
                    Recipient.name,
                    Recipient.organisation,
                    Recipient.language,
                    Recipient.country,
                    Recipient.consent_basis,
                    Recipient.consent_source,
                    Recipient.updated_at,
                )
            )
        )
        members = sorted(
            tuple(r)
            for r in s.execute(
                select(Recipient.email_key, Segment.slug)
                .join(recipient_segments, recipient_segments.c.recipient_id == Recipient.id)
                .join(Segment, Segment.id == recipient_segments.c.segment_id)
            )
        )
        segments = sorted(s.scalars(select(Segment.slug)))
    return {"recipients": recipients, "members": members, "segments": segments}


def members_of(db: Database, slug: str) -> list[str]:
    """Addresses in a segment, sorted."""
    with db.session() as s:
        return sorted(
            s.scalars(
                select(Recipient.email)
                .join(recipient_segments, recipient_segments.c.recipient_id == Recipient.id)
                .join(Segment, Segment.id == recipient_segments.c.segment_id)
                .where(Segment.slug == slug)
            )
        )


def recipient(db: Database, address: str) -> Recipient | None:
    with db.session() as s:
        return s.scalars(select(Recipient).where(Recipient.email_key == address.casefold())).first()


def membership_keys(db: Database) -> list[tuple[int, str, str, bool]]:
    """PostgreSQL: the membership table's foreign keys, as (oid, name, definition,
    validated), by name. A key dropped and added back has a new oid."""
    query = text(
        "SELECT oid::int, conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
        "WHERE conrelid = 'recipient_segments'::regclass AND contype = 'f' ORDER BY conname"
    )
    with db.engine.connect() as conn:
        return [(oid, name, definition, ok) for oid, name, definition, ok in conn.execute(query)]
