"""Recipients and segments one at a time, without a spreadsheet.

Opt-out-safe: adding an opted-out or erased address is refused (as an import refuses it);
removing a recipient is not an erasure and neither lifts nor records a suppression; and
nothing here writes to the delivery log. A recipient who has deliveries keeps the row the
log refers to (removing takes them out of every segment: no campaign reaches them again);
``recipients erase`` is the GDPR erasure. Deleting a segment drops memberships only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import PERSONAL_OPT_OUTS, Language, choices
from clara_mailer.optouts.suppressions import active_suppressions
from clara_mailer.registry.addresses import AddressError, AddressValidator, email_key
from clara_mailer.registry.importer import clean_text
from clara_mailer.registry.recipients import MEMBERS, find_recipient, show_recipient
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery, Recipient, Segment

SEGMENT_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
#: Where an address added by hand comes from, unless the caller says (printed in footers).
HAND_SOURCE = "added by hand (clara-mail recipients add)"


def _language(value: str) -> Language:
    try:
        return Language(value.strip().lower())
    except ValueError:
        raise InputError(f"unknown language {value!r} (use {choices(Language)})") from None


def _segments(session: Session, slugs: Iterable[str]) -> list[Segment]:
    wanted = list(dict.fromkeys(s.strip() for s in slugs if s.strip()))
    found = {s.slug: s for s in session.scalars(select(Segment).where(Segment.slug.in_(wanted)))}
    missing = [slug for slug in wanted if slug not in found]
    if missing:
        known = ", ".join(session.scalars(select(Segment.slug).order_by(Segment.slug)))
        raise NotFound(
            f"no segment {missing[0]!r} (known: {known or 'none'}; "
            "make one with: clara-mail segments create SLUG --name NAME)"
        )
    return [found[slug] for slug in wanted]


def _require(session: Session, address: str) -> Recipient:
    recipient = find_recipient(session, address)
    if recipient is None:
        raise NotFound(f"no recipient {address.strip()!r} in the registry")
    return recipient


def add_recipient(
    db: Database,
    signer: TokenSigner,
    address: str,
    *,
    segments: Iterable[str],
    name: str = "",
    organisation: str = "",
    language: str = "es",
    consent_source: str = "",
) -> dict[str, Any]:
    """Add one address to the registry in ``segments`` (at least one); its record.

    Refused: a malformed address, one already in the registry (edit it instead), and one
    that opted out or was erased (as an import refuses it)."""
    try:
        email = AddressValidator().normalise(address.strip())
    except AddressError as exc:
        raise InputError(f"bad address {address.strip()!r}: {exc}") from None
    chosen = list(segments)
    if not chosen:
        raise InputError(
            "say which segment with --segment (a recipient outside every segment gets nothing)"
        )
    lang = _language(language)
    with db.session() as session:
        if find_recipient(session, email) is not None:
            raise InputError(f"{email} is in the registry already: change it with recipients edit")
        reasons = active_suppressions(session, [signer.address_hash(email)])
        for reason in reasons.values():
            why = "opted out" if reason in PERSONAL_OPT_OUTS else f"suppressed ({reason})"
            raise InputError(f"{email} is {why}: it is not added")
        session.add(
            Recipient(
                email=email,
                email_key=email_key(email),
                name=clean_text(name),
                organisation=clean_text(organisation),
                language=lang,
                consent_source=clean_text(consent_source) or HAND_SOURCE,
                segments=_segments(session, chosen),
            )
        )
    return show_recipient(db, email)


def edit_recipient(
    db: Database,
    address: str,
    *,
    name: str | None = None,
    organisation: str | None = None,
    language: str | None = None,
    add_segments: Iterable[str] = (),
    remove_segments: Iterable[str] = (),
) -> dict[str, Any]:
    """Change what is given (None: unchanged; "" empties name or organisation); the record."""
    with db.session() as session:
        recipient = _require(session, address)
        if name is not None:
            recipient.name = clean_text(name)
        if organisation is not None:
            recipient.organisation = clean_text(organisation)
        if language is not None:
            recipient.language = _language(language)
        current = {s.slug: s for s in recipient.segments}
        for segment in _segments(session, add_segments):
            current.setdefault(segment.slug, segment)
        for segment in _segments(session, remove_segments):
            current.pop(segment.slug, None)
        if not current:
            raise InputError(
                f"{recipient.email} would be in no segment: to stop sending to it, use "
                "recipients remove (or optout add)"
            )
        recipient.segments = sorted(current.values(), key=lambda s: s.slug)
        email = recipient.email
    return show_recipient(db, email)


@dataclass(frozen=True)
class Removal:
    address: str
    #: The profile was deleted (it had no deliveries); else it is kept for the delivery log.
    deleted: bool
    segments: int  # memberships removed
    deliveries: int  # delivery rows referring to it, kept as they are


def remove_recipient(db: Database, address: str) -> Removal:
    """Take ``address`` out of the registry: out of every segment, and its profile deleted
    unless the delivery log refers to it. Not an erasure: no suppression is lifted or made,
    and no delivery row is touched."""
    with db.session() as session:
        recipient = _require(session, address)
        memberships = len(recipient.segments)
        deliveries = (
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.recipient_id == recipient.id)
            )
            or 0
        )
        email = recipient.email
        recipient.segments = []
        if not deliveries:
            session.delete(recipient)
    return Removal(email, not deliveries, memberships, deliveries)


# -- segments ---------------------------------------------------------------------------------


def _check_slug(slug: str) -> str:
    if not SEGMENT_SLUG.match(slug):
        raise InputError(
            f"{slug!r} is not a segment name: 1 to 64 lowercase letters, digits and -, "
            "e.g. local-police"
        )
    return slug


def _segment(session: Session, slug: str) -> Segment:
    (segment,) = _segments(session, [slug])
    return segment


def _members(session: Session, segment: Segment) -> int:
    query = select(func.count()).select_from(MEMBERS).where(MEMBERS.c.segment_id == segment.id)
    return session.scalar(query) or 0


def create_segment(db: Database, slug: str, name: str = "") -> dict[str, Any]:
    _check_slug(slug)
    with db.session() as session:
        if session.scalar(select(Segment.id).where(Segment.slug == slug)) is not None:
            raise InputError(f"segment {slug!r} exists already")
        session.add(Segment(slug=slug, name=clean_text(name) or slug))
    return {"slug": slug, "name": clean_text(name) or slug, "members": 0}


def rename_segment(
    db: Database, slug: str, new_slug: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """Give segment ``slug`` a new slug and/or name (deliveries already made are unchanged)."""
    with db.session() as session:
        segment = _segment(session, slug)
        if new_slug is not None and new_slug != slug:
            _check_slug(new_slug)
            if session.scalar(select(Segment.id).where(Segment.slug == new_slug)) is not None:
                raise InputError(f"segment {new_slug!r} exists already")
            segment.slug = new_slug
        if name is not None:
            segment.name = clean_text(name) or segment.slug
        return {"slug": segment.slug, "name": segment.name, "members": _members(session, segment)}


def delete_segment(db: Database, slug: str, *, force: bool = False) -> int:
    """Delete segment ``slug``; the number of memberships dropped. A segment with members
    is refused unless ``force``. Recipients and deliveries stay as they are."""
    with db.session() as session:
        segment = _segment(session, slug)
        members = _members(session, segment)
        if members and not force:
            raise InputError(
                f"segment {slug!r} has {members} member(s): delete it with --force (the "
                "recipients stay in the registry and in their other segments)"
            )
        session.delete(segment)
    return members
