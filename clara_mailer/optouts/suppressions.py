"""Suppressions: opt-outs, hard bounces, complaints and erasures, by keyed address hash.

Checked when a send is planned, again just before each message, and by import. The
checks (``active_suppressions``, ``any_active_suppression``) are SQLAlchemy Core on the
``suppressions`` table and take a Core connection or an ORM session alike: a send never
loads the ORM. ``stops`` is the condition for one address hash, for the delivery log's
statement that marks a group of messages ``sending``; ``stops_sql`` the same as SQL, for
its PostgreSQL form. The functions that
manage suppressions return ORM rows, so they import the models when called.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Connection, exists, func, or_, select

from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import OptOutReason, OptOutScope, choices
from clara_mailer.store import tables
from clara_mailer.store.tables import utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from clara_mailer.store.models import Suppression

#: The table's columns, for the checks (Core: no ORM).
_suppression = tables.suppressions.c


def _stops(kind: str | ColumnElement[str] | None) -> list[ColumnElement[bool]]:
    """The conditions of a suppression that stops a campaign of ``kind`` now (None: of
    any kind): not lifted, and for every kind or that one. ``kind`` may be a bound
    parameter."""
    conditions: list[ColumnElement[bool]] = [_suppression.lifted_at.is_(None)]
    if kind is not None:
        conditions.append(or_(_suppression.scope == OptOutScope.ALL, _suppression.scope == kind))
    return conditions


def stops(address_hash: ColumnElement[str], kind: ColumnElement[str]) -> ColumnElement[bool]:
    """True when an active suppression of ``address_hash`` stops a campaign of ``kind``
    (both SQL expressions, e.g. bound parameters): ``_stops`` for one address."""
    return exists().where(_suppression.address_hash == address_hash, *_stops(kind))


def stops_sql(hash_sql: str, kind_sql: str = "%(b_kind)s") -> str:
    """The condition of ``stops`` as SQL for a statement written for the driver: true
    when an active suppression of the address hash ``hash_sql`` stops a campaign of the
    kind ``kind_sql`` (by default bound as psycopg's ``%(b_kind)s``)."""
    return (
        f"EXISTS (SELECT 1 FROM {tables.suppressions.name} AS s "
        f"WHERE s.address_hash = {hash_sql} AND s.lifted_at IS NULL "
        f"AND (s.scope = '{OptOutScope.ALL.value}' OR s.scope = {kind_sql}))"
    )


def active_suppressions(
    session: Session | Connection, hashes: Iterable[str], kind: str | None = None
) -> dict[str, str]:
    """address_hash -> reason for each hash suppressed for ``kind`` (None: any scope)."""
    wanted = list(set(hashes))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        query = select(_suppression.address_hash, _suppression.reason).where(
            _suppression.address_hash.in_(chunk), *_stops(kind)
        )
        for address_hash, reason in session.execute(query):
            found.setdefault(address_hash, reason)
    return found


def any_active_suppression(session: Session | Connection, kind: str) -> bool:
    """Whether any suppression stops a campaign of ``kind`` now (one that stops every
    kind included). False lets a planner skip hashing its members' addresses: with
    nothing to match, ``active_suppressions`` would find nothing for any of them."""
    query = select(_suppression.id).where(*_stops(kind)).limit(1)
    return session.execute(query).first() is not None


def suppress(
    session: Session,
    signer: TokenSigner,
    address: str,
    *,
    reason: str,
    scope: str = OptOutScope.ALL,
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
    scope: str = OptOutScope.ALL,
    source: str = "",
    campaign_id: int | None = None,
    note: str = "",
) -> Suppression:
    from clara_mailer.store.models import Suppression

    if scope not in set(OptOutScope):
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


# --- managing suppressions (clara-mail optout, the unsubscribe page, erasure) -----------


def add(
    session: Session,
    signer: TokenSigner,
    address: str,
    *,
    reason: str = OptOutReason.MANUAL,
    scope: str = OptOutScope.ALL,
    source: str = "cli",
    note: str = "",
) -> tuple[Suppression, bool]:
    """Suppress ``address``; returns the row and whether it is new (False: already there)."""
    if scope not in set(OptOutScope):
        raise InputError(f"unknown scope {scope!r} (one of: {choices(OptOutScope)})")
    from clara_mailer.store.models import Suppression

    if not address.strip() or "@" not in address:
        raise InputError(f"not an email address: {address!r}")
    before = session.scalar(
        select(func.count())
        .select_from(Suppression)
        .where(
            Suppression.address_hash == signer.address_hash(address),
            Suppression.scope == scope,
            Suppression.lifted_at.is_(None),
        )
    )
    row = suppress(session, signer, address, reason=reason, scope=scope, source=source, note=note)
    return row, not before


def list_suppressions(session: Session, *, include_lifted: bool = True) -> list[dict[str, Any]]:
    """Every suppression, oldest first, as plain rows (no address: only its keyed hash)."""
    from clara_mailer.store.models import Campaign, Suppression

    query = (
        select(Suppression, Campaign.slug)
        .outerjoin(Campaign, Campaign.id == Suppression.campaign_id)
        .order_by(Suppression.created_at, Suppression.id)
    )
    if not include_lifted:
        query = query.where(Suppression.lifted_at.is_(None))
    return [
        {
            "address_hash": row.address_hash,
            "scope": row.scope,
            "reason": row.reason,
            "source": row.source,
            "note": row.note,
            "campaign": slug,
            "created_at": row.created_at.isoformat(timespec="seconds"),
            "lifted_at": row.lifted_at.isoformat(timespec="seconds") if row.lifted_at else None,
            "lifted_note": row.lifted_note,
        }
        for row, slug in session.execute(query)
    ]


def lift_hash(
    session: Session,
    address_hash: str,
    *,
    note: str,
    reasons: Iterable[str] | None = None,
    campaign_id: int | None = None,
) -> list[Suppression]:
    """Lift the active suppressions of one hash (optionally only some reasons or one campaign).

    The rows stay, with ``lifted_at`` and ``lifted_note``: an opt-out's history is kept.
    """
    from clara_mailer.store.models import Suppression

    query = select(Suppression).where(
        Suppression.address_hash == address_hash, Suppression.lifted_at.is_(None)
    )
    if reasons is not None:
        query = query.where(Suppression.reason.in_(list(reasons)))
    if campaign_id is not None:
        query = query.where(Suppression.campaign_id == campaign_id)
    rows = list(session.scalars(query.order_by(Suppression.id)))
    now = utcnow()
    for row in rows:
        row.lifted_at = now
        row.lifted_note = note
    session.flush()
    return rows


def lift(
    session: Session, signer: TokenSigner, address: str, *, note: str = "lifted by clara-mail"
) -> list[Suppression]:
    """Lift every active suppression of ``address``; NotFound when there is none."""
    rows = lift_hash(session, signer.address_hash(address), note=note)
    if not rows:
        raise NotFound(f"no active suppression for {address}")
    return rows


def record_erasure(session: Session, address_hash: str, *, source: str = "erase") -> Suppression:
    """Make sure an active ``erased`` suppression exists for the hash (whatever else does)."""
    from clara_mailer.store.models import Suppression

    existing = session.scalars(
        select(Suppression).where(
            Suppression.address_hash == address_hash,
            Suppression.reason == OptOutReason.ERASED,
            Suppression.lifted_at.is_(None),
        )
    ).first()
    if existing is not None:
        return existing
    row = Suppression(
        address_hash=address_hash,
        scope="all",
        reason=OptOutReason.ERASED,
        source=source,
        note="",
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row
