"""GDPR: erase one person's data, or export everything held about one address.

Erasure deletes the profile, segment memberships and RSVPs, blanks the address in the
delivery log (the rows stay for the campaign figures, with ``email`` and
``recipient_id`` NULL), scrubs the address out of stored SMTP replies, bounce
diagnostics and suppression notes, and keeps one suppression holding only a keyed hash
(reason ``erased``) so a later import or send cannot bring the person back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Delete, delete, func, or_, select
from sqlalchemy.orm import Session

from clara_mailer.core.errors import NotFound
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.deliverylog.log import forget_addresses
from clara_mailer.optouts.suppressions import record_erasure
from clara_mailer.registry.addresses import address_forms
from clara_mailer.registry.recipients import find_recipient
from clara_mailer.store.database import Database
from clara_mailer.store.models import (
    Bounce,
    Campaign,
    Delivery,
    Recipient,
    Rsvp,
    Suppression,
    recipient_segments,
)

ERASED_TEXT = "[erased]"


@dataclass(frozen=True)
class Erasure:
    """What ``erase`` did, in counts (nothing readable about the person)."""

    address_hash: str
    recipient_found: bool
    segments: int
    rsvps: int
    deliveries: int
    texts_scrubbed: int


def _hashes(signer: TokenSigner, forms: list[str], recipient: Recipient | None) -> list[str]:
    spellings = [*forms, recipient.email] if recipient else forms
    return list(dict.fromkeys(signer.address_hash(s) for s in spellings))


def _delivery_filter(forms: list[str], recipient: Recipient | None) -> Any:
    by_address = func.lower(Delivery.email).in_([f.lower() for f in forms])
    if recipient is None:
        return by_address
    return or_(by_address, Delivery.recipient_id == recipient.id)


def _bounce_filter(hashes: list[str], delivery_ids: list[int]) -> ColumnElement[bool]:
    by_hash = Bounce.address_hash.in_(hashes)
    return or_(by_hash, Bounce.delivery_id.in_(delivery_ids)) if delivery_ids else by_hash


def _deleted(session: Session, statement: Delete) -> int:
    result = cast(CursorResult[Any], session.execute(statement))
    return result.rowcount


def _scrubber(forms: list[str], recipient: Recipient | None) -> re.Pattern[str]:
    spellings = {*forms, *(f.lower() for f in forms)}
    if recipient is not None:
        spellings.add(recipient.email)
    alternatives = sorted((re.escape(s) for s in spellings), key=len, reverse=True)
    return re.compile("|".join(alternatives), re.IGNORECASE)


def erase(db: Database, signer: TokenSigner, address: str) -> Erasure:
    """Delete everything held about ``address``; keep only a keyed-hash suppression."""
    forms = address_forms(address)
    with db.session() as session:
        recipient = find_recipient(session, address)
        hashes = _hashes(signer, forms, recipient)
        pattern = _scrubber(forms, recipient)

        spellings = [*forms, recipient.email] if recipient is not None else forms
        delivery_ids, scrubbed = forget_addresses(
            session,
            spellings,
            recipient.id if recipient is not None else None,
            lambda text: pattern.sub(ERASED_TEXT, text),
        )

        bounce_filter = _bounce_filter(hashes, delivery_ids)
        for bounce in session.scalars(select(Bounce).where(bounce_filter)):
            if pattern.search(bounce.diagnostic):
                bounce.diagnostic = pattern.sub(ERASED_TEXT, bounce.diagnostic)
                scrubbed += 1

        for row in session.scalars(select(Suppression).where(Suppression.address_hash.in_(hashes))):
            if pattern.search(row.note):
                row.note = pattern.sub(ERASED_TEXT, row.note)
                scrubbed += 1
            if row.lifted_note and pattern.search(row.lifted_note):
                row.lifted_note = pattern.sub(ERASED_TEXT, row.lifted_note)
                scrubbed += 1

        segments = rsvps = 0
        if recipient is not None:
            segments = _deleted(
                session,
                delete(recipient_segments).where(recipient_segments.c.recipient_id == recipient.id),
            )
            rsvps = _deleted(session, delete(Rsvp).where(Rsvp.recipient_id == recipient.id))
            session.execute(delete(Recipient).where(Recipient.id == recipient.id))

        for address_hash in hashes:
            record_erasure(session, address_hash)

    return Erasure(
        address_hash=hashes[0],
        recipient_found=recipient is not None,
        segments=segments,
        rsvps=rsvps,
        deliveries=len(delivery_ids),
        texts_scrubbed=scrubbed,
    )


def _when(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def export_data(db: Database, signer: TokenSigner, address: str) -> dict[str, Any]:
    """Everything held about ``address`` as JSON-ready data; NotFound when nothing is."""
    forms = address_forms(address)
    with db.session() as session:
        recipient = find_recipient(session, address)
        hashes = _hashes(signer, forms, recipient)

        profile = consent = None
        segments: list[str] = []
        rsvps: list[dict[str, Any]] = []
        if recipient is not None:
            profile = {
                "email": recipient.email,
                "name": recipient.name,
                "organisation": recipient.organisation,
                "language": recipient.language,
                "country": recipient.country,
                "created_at": _when(recipient.created_at),
                "updated_at": _when(recipient.updated_at),
            }
            consent = {"basis": recipient.consent_basis, "source": recipient.consent_source}
            segments = [segment.slug for segment in recipient.segments]
            rsvps = [
                {"campaign": slug, "answer": rsvp.answer, "answered_at": _when(rsvp.answered_at)}
                for rsvp, slug in session.execute(
                    select(Rsvp, Campaign.slug)
                    .join(Campaign, Campaign.id == Rsvp.campaign_id)
                    .where(Rsvp.recipient_id == recipient.id)
                    .order_by(Rsvp.answered_at)
                )
            ]

        delivery_rows = session.execute(
            select(Delivery, Campaign.slug)
            .join(Campaign, Campaign.id == Delivery.campaign_id)
            .where(_delivery_filter(forms, recipient))
            .order_by(Delivery.created_at, Delivery.id)
        ).all()
        deliveries = [
            {
                "campaign": slug,
                "email": d.email,
                "segment": d.segment,
                "language": d.language,
                "status": d.status,
                "attempts": d.attempts,
                "smtp_code": d.smtp_code,
                "smtp_reply": d.smtp_reply,
                "message_id": d.message_id,
                "created_at": _when(d.created_at),
                "sent_at": _when(d.sent_at),
            }
            for d, slug in delivery_rows
        ]
        delivery_ids = [d.id for d, _ in delivery_rows]

        optouts = [
            {
                "scope": row.scope,
                "reason": row.reason,
                "source": row.source,
                "created_at": _when(row.created_at),
                "lifted_at": _when(row.lifted_at),
                "lifted_note": row.lifted_note,
            }
            for row in session.scalars(
                select(Suppression)
                .where(Suppression.address_hash.in_(hashes))
                .order_by(Suppression.created_at, Suppression.id)
            )
        ]

        bounce_filter = _bounce_filter(hashes, delivery_ids)
        bounces = [
            {
                "campaign": slug,
                "kind": bounce.kind,
                "status": bounce.status_code,
                "action": bounce.action,
                "diagnostic": bounce.diagnostic,
                "received_at": _when(bounce.received_at),
            }
            for bounce, slug in session.execute(
                select(Bounce, Campaign.slug)
                .outerjoin(Campaign, Campaign.id == Bounce.campaign_id)
                .where(bounce_filter)
                .order_by(Bounce.received_at, Bounce.id)
            )
        ]

    if profile is None and not (deliveries or optouts or bounces):
        raise NotFound(f"nothing is held about {address.strip()}")
    return {
        "address": address.strip(),
        "profile": profile,
        "consent": consent,
        "segments": segments,
        "deliveries": deliveries,
        "opt_outs": optouts,
        "rsvps": rsvps,
        "bounces": bounces,
    }
