"""Applying bounces: match each one to the delivery that caused it, record it once, and
apply the bounce policy.

A bounce often arrives long after the SMTP server said 250. Each one read by ``parse``
becomes a ``bounces`` row linked to its delivery, and then, by its kind:

- hard: the delivery becomes ``bounced`` and the address is suppressed (reason
  ``hard-bounce``);
- soft: the delivery becomes ``bounced``; after ``soft_bounce_limit`` soft bounces within
  ``soft_bounce_window_days`` the address is suppressed (reason ``soft-bounces``);
- policy speaks of the sender: the delivery becomes ``bounced``, the report warns, the
  recipient is not suppressed;
- delayed: recorded, nothing else changes.

The delivery's state changes through the delivery log (``mark_bounced``).

Matching tries, in order, the VERP token of the envelope sender (which the bounce is
addressed to), the Message-ID of the returned original, then the address (within one
campaign when given). A bounce carrying a token shaped like ours that does not verify
(altered or forged) matches nothing: it is recorded unmatched and suppresses no one,
since anyone can address a DSN to ``bounces+anything@`` naming any recipient. Each bounce is recorded once, keyed by its own Message-ID or a
hash of its content, so reading a mailbox twice changes nothing.

The same readers take the requests sent to the ``mailto:`` address every message
advertises in ``List-Unsubscribe``: a message (not a bounce) whose Subject is
``unsubscribe-TOKEN`` with a valid signed unsubscribe token records the opt-out exactly
as the one-click POST does (``optouts.links.unsubscribe``, reason ``one-click``: the
mail client's own unsubscribe). A token that does not verify changes nothing and the
message is left for a person. The suppression's note keeps the request's key, so a
request read again (or after the person undid the opt-out on the web page) is counted
``already seen`` and applied once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clara_mailer.bounces.mailboxes import BounceSource, MailboxMessage, OpenMailbox
from clara_mailer.bounces.parse import (
    BounceEvent,
    ParsedMessage,
    message_key,
    parse_bounce,
    read_headers,
    smtp_code,
)
from clara_mailer.core.errors import NotFound, TokenError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner, verp_token
from clara_mailer.core.vocabulary import BounceKind, OptOutReason, Status
from clara_mailer.deliverylog.log import mark_bounced
from clara_mailer.optouts import links
from clara_mailer.optouts.suppressions import active_suppressions, suppress_hash
from clara_mailer.store.database import Database
from clara_mailer.store.models import Bounce, Campaign, Delivery, Recipient, Suppression

#: The Subject of a ``List-Unsubscribe`` mailto request (``compose.render``), once the
#: mail client has sent it: ``unsubscribe-TOKEN``.
_UNSUBSCRIBE_SUBJECT = re.compile(r"unsubscribe-([A-Za-z0-9]{8,200})", re.IGNORECASE)
#: What the note of a suppression recorded from a mailto request starts with; the
#: request's key follows.
UNSUBSCRIBE_NOTE = "unsubscribe request by mail "


@dataclass(frozen=True)
class Unmatched:
    """A bounce that names no delivery we know."""

    ref: str
    address: str
    status: str
    kind: BounceKind


@dataclass(frozen=True)
class PolicyWarning:
    """A 5.7.x bounce: the receiver refused the sender, not the address."""

    ref: str
    address: str
    status: str
    diagnostic: str


@dataclass
class BounceReport:
    """What an import read and did (``dry_run``: nothing was written)."""

    source: str = ""
    dry_run: bool = False
    read: int = 0
    bounces: int = 0
    hard: int = 0
    soft: int = 0
    policy: int = 0
    delayed: int = 0
    auto_replies: int = 0
    not_bounces: int = 0
    unsubscribe_requests: int = 0
    unsubscribed: int = 0
    bad_unsubscribe_requests: int = 0
    matched: int = 0
    already_seen: int = 0
    suppressed: int = 0
    unmatched: list[Unmatched] = field(default_factory=list)
    warnings: list[PolicyWarning] = field(default_factory=list)
    matched_by: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "read": self.read,
            "bounces": self.bounces,
            "hard": self.hard,
            "soft": self.soft,
            "policy": self.policy,
            "delayed": self.delayed,
            "auto-replies ignored": self.auto_replies,
            "not bounces": self.not_bounces,
            "unmatched": len(self.unmatched),
            "already seen": self.already_seen,
            "addresses suppressed": self.suppressed,
        }

    def unsubscribe_counts(self) -> dict[str, int]:
        """The mailto unsubscribe requests read (a request read again is ``already seen``)."""
        return {
            "unsubscribe requests": self.unsubscribe_requests,
            "opted out by mail": self.unsubscribed,
            "unsubscribes refused": self.bad_unsubscribe_requests,
        }

    def merge(self, other: BounceReport) -> None:
        for name in (
            "read",
            "bounces",
            "hard",
            "soft",
            "policy",
            "delayed",
            "auto_replies",
            "not_bounces",
            "unsubscribe_requests",
            "unsubscribed",
            "bad_unsubscribe_requests",
            "matched",
            "already_seen",
            "suppressed",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unmatched += other.unmatched
        self.warnings += other.warnings
        for how, n in other.matched_by.items():
            self.matched_by[how] = self.matched_by.get(how, 0) + n


def _by_verp(session: Session, signer: TokenSigner, candidates: Iterable[str]) -> Delivery | None:
    for candidate in candidates:
        token = verp_token(candidate)
        if not token:
            continue
        try:
            data = signer.verify("b", token)
        except TokenError:
            continue  # someone else's plus-address, or an altered token
        delivery = session.scalars(
            select(Delivery).where(
                Delivery.campaign_id == data.campaign_id,
                Delivery.recipient_id == data.recipient_id,
            )
        ).first()
        if delivery is not None:
            return delivery
    return None


#: What sign("b", ...) produces: lowercase base32 of 2+ varint bytes and a 16-byte MAC
#: (case-folded, as VERP local parts may come back upper-cased). A shorter plus-part is
#: someone's sub-address, not a token.
_TOKEN_SHAPE = re.compile(r"[a-z2-7]{29,80}", re.IGNORECASE)


def _has_forged_verp(signer: TokenSigner, candidates: Iterable[str]) -> bool:
    """Whether an address carries a token shaped like ours whose signature fails."""
    for candidate in candidates:
        token = verp_token(candidate)
        if not token or not _TOKEN_SHAPE.fullmatch(token):
            continue
        try:
            signer.verify("b", token)
        except TokenError:
            return True
    return False


def _by_message_id(session: Session, message_id: str | None) -> Delivery | None:
    if not message_id:
        return None
    bare = message_id.strip().strip("<>")
    return session.scalars(
        select(Delivery).where(Delivery.message_id.in_([f"<{bare}>", bare])).order_by(Delivery.id)
    ).first()


def _by_address(session: Session, address: str, campaign_id: int | None) -> Delivery | None:
    if not address:
        return None
    query = select(Delivery).where(
        func.lower(Delivery.email) == address.strip().lower(),
        Delivery.status.in_([Status.SENT, Status.UNKNOWN, Status.BOUNCED]),
    )
    if campaign_id is not None:
        query = query.where(Delivery.campaign_id == campaign_id)
    # Without a campaign the newest message sent to the address is the likeliest cause.
    query = query.order_by(Delivery.sent_at.desc().nulls_last(), Delivery.id.desc())
    return session.scalars(query).first()


def match_delivery(
    session: Session,
    signer: TokenSigner,
    parsed: ParsedMessage,
    event: BounceEvent,
    campaign_id: int | None = None,
) -> tuple[Delivery | None, str]:
    """The delivery a bounce speaks of and how it was found (``verp``, ``message-id``,
    ``address``), or ``(None, "")``; always ``(None, "")`` for a forged VERP token."""
    delivery = _by_verp(session, signer, parsed.verp_candidates)
    if delivery is not None:
        return delivery, "verp"
    if _has_forged_verp(signer, parsed.verp_candidates):
        return None, ""  # never trusted: no fallback to the Message-ID or the address
    delivery = _by_message_id(session, parsed.original_message_id)
    if delivery is not None:
        return delivery, "message-id"
    delivery = _by_address(session, event.address, campaign_id)
    if delivery is not None:
        return delivery, "address"
    return None, ""


def _soft_bounces_in_window(
    session: Session, address_hash: str, until: dt.datetime, days: int
) -> int:
    since = until - dt.timedelta(days=days)
    return (
        session.scalar(
            select(func.count())
            .select_from(Bounce)
            .where(
                Bounce.address_hash == address_hash,
                Bounce.kind == BounceKind.SOFT,
                Bounce.received_at > since,
                Bounce.received_at <= until,
            )
        )
        or 0
    )


def record_message(
    session: Session,
    signer: TokenSigner,
    settings: Settings,
    message: MailboxMessage,
    *,
    campaign_id: int | None = None,
) -> BounceReport:
    """Parse one message and record what it means in ``session`` (not committed)."""
    report = BounceReport(read=1)
    parsed = parse_bounce(message.raw)
    if parsed.category == "auto-reply":
        report.auto_replies = 1
        return report
    if parsed.category == "other":
        report.not_bounces = 1
        return report
    for index, event in enumerate(parsed.events):
        key = parsed.message_key if index == 0 else f"{parsed.message_key}#{index}"
        if session.scalar(select(Bounce.id).where(Bounce.message_key == key)) is not None:
            report.already_seen += 1
            continue
        kind = event.kind
        if kind is None:  # a success report: parse_bounce leaves these out
            continue
        delivery, how = match_delivery(session, signer, parsed, event, campaign_id)
        address = (delivery.email if delivery is not None else None) or event.address
        address_hash = signer.address_hash(address) if address else None
        session.add(
            Bounce(
                message_key=key,
                delivery_id=delivery.id if delivery is not None else None,
                campaign_id=delivery.campaign_id if delivery is not None else None,
                address_hash=address_hash,
                kind=kind,
                status_code=event.status,
                action=event.action[:16],
                diagnostic=event.diagnostic,
                received_at=parsed.received_at,
            )
        )
        session.flush()
        report.bounces += 1
        setattr(report, kind.value, getattr(report, kind.value) + 1)
        if kind == BounceKind.POLICY:
            report.warnings.append(
                PolicyWarning(message.ref, address or "", event.status, event.diagnostic)
            )
        if delivery is None:
            report.unmatched.append(Unmatched(message.ref, event.address, event.status, kind))
            continue
        report.matched += 1
        report.matched_by[how] = report.matched_by.get(how, 0) + 1
        if kind == BounceKind.DELAYED:
            continue
        mark_bounced(
            session,
            delivery.id,
            smtp_code=smtp_code(event.diagnostic),
            smtp_reply=f"bounce {event.status} {event.diagnostic}".strip(),
        )
        if address_hash is None:
            continue
        reason: OptOutReason | None = None
        if kind == BounceKind.HARD:
            reason = OptOutReason.HARD_BOUNCE
        elif (
            kind == BounceKind.SOFT
            and _soft_bounces_in_window(
                session, address_hash, parsed.received_at, settings.soft_bounce_window_days
            )
            >= settings.soft_bounce_limit
        ):
            reason = OptOutReason.SOFT_BOUNCES
        if reason is not None:
            if address_hash not in active_suppressions(session, [address_hash]):
                report.suppressed += 1
            suppress_hash(
                session,
                address_hash,
                reason=reason,
                source=f"bounce {event.status}"[:200],
                campaign_id=delivery.campaign_id,
                note=event.diagnostic,
            )
    return report


def unsubscribe_token(raw: bytes) -> str | None:
    """The token of a ``List-Unsubscribe`` mailto request (Subject ``unsubscribe-TOKEN``)."""
    subject = read_headers(raw)[1]
    found = _UNSUBSCRIBE_SUBJECT.fullmatch(subject.strip())
    return found.group(1) if found else None


def _request_seen(session: Session, address_hash: str, note: str) -> bool:
    """Whether a suppression of this address notes this very request (lifted or not)."""
    return (
        session.scalar(
            select(Suppression.id).where(
                Suppression.address_hash == address_hash,
                Suppression.note.contains(note, autoescape=True),
            )
        )
        is not None
    )


def _dry_run_target(session: Session, signer: TokenSigner, token: str) -> str | None:
    """``links.resolve`` inside the dry run's session (which holds SQLite's write lock):
    the address a valid token names, else None."""
    try:
        data = signer.verify("u", token)
    except TokenError:
        return None
    campaign = session.get(Campaign, data.campaign_id)
    recipient = session.get(Recipient, data.recipient_id)
    return recipient.email if campaign is not None and recipient is not None else None


def record_unsubscribe_request(
    db: Database,
    session: Session,
    signer: TokenSigner,
    message: MailboxMessage,
    token: str,
    *,
    dry_run: bool = False,
) -> BounceReport:
    """Apply one mailto unsubscribe request as the one-click POST would, once per message.

    ``session`` is the import's: with ``dry_run`` it only reads (and may hold flushed,
    uncommitted bounces); otherwise it has nothing pending and is committed here before
    ``links`` opens its own transactions.
    """
    report = BounceReport(read=1)
    msg, _subject = read_headers(message.raw)
    note = UNSUBSCRIBE_NOTE + message_key(msg, message.raw)
    if dry_run:
        email = _dry_run_target(session, signer, token)
        if email is None:
            report.bad_unsubscribe_requests = 1
            return report
        report.unsubscribe_requests = 1
        address_hash = signer.address_hash(email)
        if _request_seen(session, address_hash, note):
            report.already_seen = 1
        elif address_hash not in active_suppressions(session, [address_hash]):
            report.unsubscribed = 1
        return report

    session.commit()  # end the import's transaction: SQLite allows one writer at a time
    try:
        target = links.resolve(db, signer, "u", token)
    except (TokenError, NotFound):
        report.bad_unsubscribe_requests = 1  # forged, altered or gone: nothing changes
        return report
    report.unsubscribe_requests = 1
    address_hash = signer.address_hash(target.email)
    seen = _request_seen(session, address_hash, note)
    already = address_hash in active_suppressions(session, [address_hash])
    session.commit()
    if seen:
        report.already_seen = 1
        return report
    links.unsubscribe(db, signer, target, one_click=True)
    row = session.scalars(
        select(Suppression)
        .where(Suppression.address_hash == address_hash, Suppression.lifted_at.is_(None))
        .order_by(Suppression.id.desc())
    ).first()
    if row is not None:  # the new opt-out, or the one that was there: note the request
        row.note = f"{row.note}; {note}" if row.note else note
    if not already:
        report.unsubscribed = 1
    return report


def import_bounces(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    source: BounceSource,
    *,
    dry_run: bool = False,
    campaign: str | None = None,
) -> BounceReport:
    """Read every new message in ``source``, record its bounces, apply the policy.

    Each message is committed on its own before the mailbox marks it processed, so an
    interrupted run loses nothing and a rerun records nothing twice. ``dry_run`` reads
    and reports but writes nothing and leaves the mailbox as it was. ``signer`` checks
    the VERP tokens and hashes the addresses (the one the messages were sent with).
    """
    report = BounceReport(source=source.describe(), dry_run=dry_run)
    with db.sessionmaker() as session:
        campaign_id = None
        if campaign is not None:
            campaign_id = session.scalar(select(Campaign.id).where(Campaign.slug == campaign))
            if campaign_id is None:
                raise NotFound(f"no campaign {campaign!r}")
        with OpenMailbox(source, readonly=dry_run) as box:
            for message in box.messages():
                outcome = record_message(
                    session, signer, settings, message, campaign_id=campaign_id
                )
                token = unsubscribe_token(message.raw) if outcome.not_bounces else None
                if token is not None:
                    outcome = record_unsubscribe_request(
                        db, session, signer, message, token, dry_run=dry_run
                    )
                if not dry_run:
                    try:
                        session.commit()
                    except IntegrityError:
                        # Another import recorded the same bounce meanwhile.
                        session.rollback()
                        outcome = BounceReport(read=1, already_seen=max(1, outcome.bounces))
                report.merge(outcome)
                # Not a bounce, or a request with a bad token: left for a person to read.
                handled = outcome.not_bounces == 0 and outcome.bad_unsubscribe_requests == 0
                box.done(message, handled=handled)
        session.rollback()
    return report
