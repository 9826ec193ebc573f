"""What the links in a message do: unsubscribe (``/u/TOKEN``) and answer an invitation
(``/r/TOKEN``). The web app parses requests and calls these; tests can call them directly.

A token only says (purpose, campaign id, recipient id); ``resolve`` checks its signature
and that both still exist, raising ``TokenError`` or ``NotFound`` without saying more.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import (
    LANGUAGES,
    SELF_SERVICE_OPT_OUTS,
    OptOutReason,
    RsvpAnswer,
)
from clara_mailer.optouts import suppressions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Recipient, Rsvp, utcnow

ANSWERS = tuple(RsvpAnswer)


@dataclass(frozen=True)
class LinkTarget:
    """The campaign and recipient a valid token names, read in one short transaction."""

    campaign_id: int
    campaign_slug: str
    campaign_kind: str
    recipient_id: int
    email: str
    language: str


def resolve(db: Database, signer: TokenSigner, purpose: str, token: str) -> LinkTarget:
    """The target of a token; TokenError if forged or altered, NotFound if gone."""
    data = signer.verify(purpose, token)
    with db.session() as session:
        campaign = session.get(Campaign, data.campaign_id)
        recipient = session.get(Recipient, data.recipient_id)
        if campaign is None or recipient is None:
            raise NotFound("unknown campaign or recipient")
        if purpose == "r" and campaign.kind != "invitation":
            raise NotFound("not an invitation")
        language = recipient.language if recipient.language in LANGUAGES else LANGUAGES[0]
        return LinkTarget(
            campaign.id, campaign.slug, campaign.kind, recipient.id, recipient.email, language
        )


def is_unsubscribed(db: Database, signer: TokenSigner, target: LinkTarget) -> bool:
    """Whether messages of this campaign's kind are suppressed for the target's address."""
    with db.session() as session:
        found = suppressions.active_suppressions(
            session, [signer.address_hash(target.email)], target.campaign_kind
        )
    return bool(found)


def unsubscribe(db: Database, signer: TokenSigner, target: LinkTarget, *, one_click: bool) -> None:
    """Suppress the address for every campaign, noting the campaign and how it came."""
    with db.session() as session:
        suppressions.suppress(
            session,
            signer,
            target.email,
            reason=OptOutReason.ONE_CLICK if one_click else OptOutReason.UNSUBSCRIBE,
            scope="all",
            source=target.campaign_slug,
            campaign_id=target.campaign_id,
        )


def undo_unsubscribe(db: Database, signer: TokenSigner, target: LinkTarget) -> int:
    """Lift the opt-outs the person made from a message (never a bounce or a manual one)."""
    with db.session() as session:
        lifted = suppressions.lift_hash(
            session,
            signer.address_hash(target.email),
            note=f"undone on the unsubscribe page at {utcnow().isoformat(timespec='seconds')}",
            reasons=tuple(SELF_SERVICE_OPT_OUTS),
        )
    return len(lifted)


def rsvp_answer(db: Database, target: LinkTarget) -> str | None:
    """The current answer (``yes``/``no``) to the invitation, if any."""
    with db.session() as session:
        return session.scalar(
            select(Rsvp.answer).where(
                Rsvp.campaign_id == target.campaign_id, Rsvp.recipient_id == target.recipient_id
            )
        )


def record_rsvp(db: Database, target: LinkTarget, answer: str) -> None:
    """Record an answer; a later answer replaces an earlier one (one row per person)."""
    if answer not in ANSWERS:
        raise InputError("the answer must be yes or no")

    def store() -> None:
        with db.session() as session:
            row = session.scalars(
                select(Rsvp).where(
                    Rsvp.campaign_id == target.campaign_id,
                    Rsvp.recipient_id == target.recipient_id,
                )
            ).first()
            if row is None:
                session.add(
                    Rsvp(
                        campaign_id=target.campaign_id,
                        recipient_id=target.recipient_id,
                        answer=RsvpAnswer(answer),
                        answered_at=utcnow(),
                    )
                )
            else:
                row.answer, row.answered_at = RsvpAnswer(answer), utcnow()

    try:
        store()
    except IntegrityError:
        store()  # a double click inserted the row first: now it exists, so update it
