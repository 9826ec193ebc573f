"""The registry as the rest of clara-mail reads it: segments with their member counts,
recipients by address, and the one function that finds a recipient by address.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from clara_mailer.core.errors import NotFound
from clara_mailer.registry.addresses import address_forms
from clara_mailer.store.database import Database
from clara_mailer.store.models import Recipient, Segment, recipient_segments

MEMBERS = recipient_segments


def find_recipient(session: Session, address: str) -> Recipient | None:
    """The recipient stored under ``address`` in any of its spellings (as typed,
    normalised, ASCII/IDNA; case-folded), or None. Raises InputError for a string that is
    not an address at all."""
    forms = address_forms(address)
    return session.scalars(select(Recipient).where(Recipient.email_key.in_(forms))).first()


def list_segments(db: Database) -> list[dict[str, Any]]:
    """Every segment with its member count, by slug."""
    count = func.count(MEMBERS.c.recipient_id)
    query = (
        select(Segment.slug, Segment.name, count.label("members"))
        .outerjoin(MEMBERS, MEMBERS.c.segment_id == Segment.id)
        .group_by(Segment.id, Segment.slug, Segment.name)
        .order_by(Segment.slug)
    )
    with db.session() as session:
        return [dict(row._mapping) for row in session.execute(query)]


def require_segment(db: Database, slug: str) -> None:
    """NotFound, naming the known segments, unless a segment ``slug`` exists."""
    with db.session() as session:
        if session.scalar(select(Segment.id).where(Segment.slug == slug)) is None:
            known = ", ".join(session.scalars(select(Segment.slug).order_by(Segment.slug)))
            raise NotFound(f"no segment {slug!r} (known: {known or 'none'})")


RECIPIENT_COLUMNS = [
    "email",
    "name",
    "organisation",
    "language",
    "country",
    "segments",
    "consent_basis",
    "consent_source",
    "created_at",
    "updated_at",
]


def _segments_of(session: Session, ids: Iterable[int]) -> dict[int, list[str]]:
    wanted = list(ids)
    out: dict[int, list[str]] = {}
    for start in range(0, len(wanted), 1000):
        query = (
            select(MEMBERS.c.recipient_id, Segment.slug)
            .join(Segment, Segment.id == MEMBERS.c.segment_id)
            .where(MEMBERS.c.recipient_id.in_(wanted[start : start + 1000]))
            .order_by(Segment.slug)
        )
        for rid, slug in session.execute(query):
            out.setdefault(rid, []).append(slug)
    return out


def _recipient_dict(row: Any, segments: list[str]) -> dict[str, Any]:
    data = {c: None if c == "segments" else getattr(row, c) for c in RECIPIENT_COLUMNS}
    data["segments"] = ";".join(segments)
    for stamp in ("created_at", "updated_at"):
        data[stamp] = getattr(row, stamp).isoformat(sep=" ", timespec="seconds")
    return data


def list_recipients(db: Database, segment: str | None = None) -> list[dict[str, Any]]:
    """Recipients by address (optionally one segment's), with their segments."""
    with db.session() as session:
        query = select(Recipient).order_by(Recipient.email_key)
        if segment is not None:
            seg_id = session.scalar(select(Segment.id).where(Segment.slug == segment))
            if seg_id is None:
                known = ", ".join(session.scalars(select(Segment.slug).order_by(Segment.slug)))
                raise NotFound(f"no segment {segment!r} (known: {known})")
            query = query.where(
                Recipient.id.in_(
                    select(MEMBERS.c.recipient_id).where(MEMBERS.c.segment_id == seg_id)
                )
            )
        rows = list(session.scalars(query))
        segments = _segments_of(session, (r.id for r in rows))
        return [_recipient_dict(r, segments.get(r.id, [])) for r in rows]


def show_recipient(db: Database, address: str) -> dict[str, Any]:
    """Everything the registry holds about one address, or NotFound."""
    with db.session() as session:
        recipient = find_recipient(session, address)
        if recipient is None:
            raise NotFound(f"no recipient {address.strip()!r} in the registry")
        return _recipient_dict(
            recipient, _segments_of(session, [recipient.id]).get(recipient.id, [])
        )
