"""The audit table: one row per action of a dashboard user or an account command."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from clara_mailer.store.database import Database
from clara_mailer.store.models import AuditEntry, utcnow

#: Longest detail kept (a look-up's query, an address): the rest is cut.
MAX_DETAIL = 500


def add_entry(session: Session, who: str, what: str, detail: str = "") -> AuditEntry:
    """Record one action in ``session``'s transaction (with the change it describes)."""
    entry = AuditEntry(at=utcnow(), who=who[:200], what=what[:64], detail=detail[:MAX_DETAIL])
    session.add(entry)
    return entry


def record(db: Database, who: str, what: str, detail: str = "") -> None:
    with db.session() as s:
        add_entry(s, who, what, detail)


def entries(
    db: Database, *, limit: int | None = None, who: str | None = None
) -> list[dict[str, Any]]:
    """The newest entries first (``limit`` of them), optionally one user's."""
    query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
    if who is not None:
        query = query.where(AuditEntry.who == who)
    if limit is not None:
        query = query.limit(limit)
    with db.session() as s:
        return [
            {
                "at": e.at.isoformat(sep=" ", timespec="seconds"),
                "who": e.who,
                "what": e.what,
                "detail": e.detail,
            }
            for e in s.scalars(query)
        ]
