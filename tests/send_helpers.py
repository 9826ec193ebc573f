"""Helpers for the sending tests: a registry filled directly through the models."""

from __future__ import annotations

from sqlalchemy import insert, select

from clara_mailer.db import Database
from clara_mailer.models import Recipient, Segment, recipient_segments, utcnow


def add_recipients(
    db: Database,
    count: int,
    segment: str = "local-police",
    *,
    prefix: str = "agente",
    domain: str = "policia.example",
    language: str | None = None,
    start: int = 0,
) -> list[str]:
    """Add ``count`` recipients to ``segment``; returns their addresses."""
    now = utcnow()
    addresses = [f"{prefix}{i:05d}@{domain}" for i in range(start, start + count)]
    with db.session() as s:
        segment_id = s.scalar(select(Segment.id).where(Segment.slug == segment))
        rows = [
            {
                "email": a,
                "email_key": a.casefold(),
                "name": f"Agente {i}",
                "organisation": "Policía Municipal",
                "language": language or ("es" if i % 3 else "en"),
                "country": "ES",
                "consent_basis": "legitimate-interest",
                "consent_source": "test",
                "created_at": now,
                "updated_at": now,
            }
            for i, a in enumerate(addresses, start)
        ]
        s.execute(insert(Recipient), rows)
        ids = dict(
            s.execute(
                select(Recipient.email, Recipient.id).where(Recipient.email.in_(addresses))
            ).all()
        )
        s.execute(
            insert(recipient_segments),
            [{"recipient_id": ids[a], "segment_id": segment_id} for a in addresses],
        )
    return addresses


def add_to_segment(db: Database, address: str, segment: str) -> None:
    with db.session() as s:
        recipient = s.scalars(select(Recipient).where(Recipient.email == address)).one()
        recipient.segments.append(s.scalars(select(Segment).where(Segment.slug == segment)).one())
