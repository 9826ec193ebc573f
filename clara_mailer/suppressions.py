"""Suppressions: opt-outs, hard bounces, complaints and erasures, by keyed address hash.

Checked when a send is planned, again just before each message, and by import.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from .models import Suppression, utcnow
from .tokens import TokenSigner

SCOPES = ("all", "newsletter", "invitation")
REASONS = (
    "unsubscribe",
    "one-click",
    "manual",
    "hard-bounce",
    "soft-bounces",
    "complaint",
    "erased",
)


def active_suppressions(
    session: Session, hashes: Iterable[str], kind: str | None = None
) -> dict[str, str]:
    """address_hash -> reason for each hash suppressed for ``kind`` (None: any scope)."""
    wanted = list(set(hashes))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        query = select(Suppression.address_hash, Suppression.reason).where(
            Suppression.address_hash.in_(chunk), Suppression.lifted_at.is_(None)
        )
        if kind is not None:
            query = query.where(or_(Suppression.scope == "all", Suppression.scope == kind))
        for address_hash, reason in session.execute(query):
            found.setdefault(address_hash, reason)
    return found


def suppress(
    session: Session,
    signer: TokenSigner,
    address: str,
    *,
    reason: str,
    scope: str = "all",
    source: str = "",
    campaign_id: int | None = None,
    note: str = "",
) -> Suppression:
    """Record a suppression unless an active one with the same scope exists already."""
    return suppress_hash(
        session,
        signer.address_hash(address),
        reason=reason,
        scope=scope,
        source=source,
        campaign_id=campaign_id,
        note=note,
    )


def suppress_hash(
    session: Session,
    address_hash: str,
    *,
    reason: str,
    scope: str = "all",
    source: str = "",
    campaign_id: int | None = None,
    note: str = "",
) -> Suppression:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    existing = session.scalars(
        select(Suppression).where(
            Suppression.address_hash == address_hash,
            Suppression.scope == scope,
            Suppression.lifted_at.is_(None),
        )
    ).first()
    if existing is not None:
        return existing
    row = Suppression(
        address_hash=address_hash,
        scope=scope,
        reason=reason,
        source=source,
        campaign_id=campaign_id,
        note=note,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row
