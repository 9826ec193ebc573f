"""Follow-ups by what happened: the ``send --where`` filters and ``--exclude-segment``.

A filter narrows who gets a delivery row when a campaign is planned (the segments still
say who is a candidate, and the opt-outs still apply)::

    rsvp=yes|no|none:CAMPAIGN     the answer to an invitation (none: no answer recorded)
    status=sent|failed|...:CAMPAIGN  the delivery's state in another campaign
    language=es|en                the recipient's language
    country=XX                    the recipient's country (ISO 3166 two-letter code)

Several values are alternatives (``status=failed,bounced:CAMPAIGN``); several filters
must all hold. ``parse_filters`` checks the syntax (no database); ``member_conditions``
resolves the campaigns and segments named and returns SQL conditions on the
``recipients`` table, which ``DeliveryLog.plan``/``preview_plan`` and the dry run add to
their member queries: SQLAlchemy Core alone, so a send loads no ORM. Every problem is an
``InputError`` (one line, exit status 2).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Connection, exists, or_, select

from clara_mailer.core.errors import InputError
from clara_mailer.core.vocabulary import LANGUAGES, CampaignKind, RsvpAnswer, Status
from clara_mailer.store import tables
from clara_mailer.store.tables import recipient_segments as _members

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

#: The tables' columns (Core: a send loads no ORM).
Campaign = tables.campaigns.c
Recipient = tables.recipients.c
Segment = tables.segments.c

#: ``none``: no answer recorded for the campaign.
RSVP_VALUES: tuple[str, ...] = (*(a.value for a in RsvpAnswer), "none")
#: The outcomes a follow-up may select by (not the transient queued and sending).
STATUS_VALUES: tuple[str, ...] = (
    Status.SENT,
    Status.FAILED,
    Status.BOUNCED,
    Status.DEFERRED,
    Status.UNKNOWN,
    Status.SKIPPED,
)
#: key -> (allowed values, or None for a pattern; whether ``:CAMPAIGN`` is required)
KEYS: dict[str, tuple[tuple[str, ...] | None, bool]] = {
    "rsvp": (RSVP_VALUES, True),
    "status": (STATUS_VALUES, True),
    "language": (LANGUAGES, False),
    "country": (None, False),
}
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")


@dataclass(frozen=True)
class Filter:
    """One parsed ``--where``: ``key=value[,value...][:campaign]``."""

    key: str
    values: tuple[str, ...]
    campaign: str = ""

    def __str__(self) -> str:
        tail = f":{self.campaign}" if self.campaign else ""
        return f"{self.key}={','.join(self.values)}{tail}"


def parse_filter(text: str) -> Filter:
    """``rsvp=none:conference-2022-02-04`` -> Filter; InputError naming what is wrong."""
    where = f"--where {text!r}"
    key, eq, rest = text.partition("=")
    key = key.strip().lower()
    if not eq:
        raise InputError(f"{where}: write KEY=VALUE (keys: {', '.join(KEYS)})")
    if key not in KEYS:
        raise InputError(f"{where}: unknown key {key!r} (known: {', '.join(KEYS)})")
    allowed, needs_campaign = KEYS[key]
    raw, colon, campaign = rest.partition(":")
    campaign = campaign.strip()
    if needs_campaign and not campaign:
        raise InputError(f"{where}: name the campaign: {key}=VALUE:CAMPAIGN")
    if not needs_campaign and colon:
        raise InputError(f"{where}: {key} takes no campaign (write {key}=VALUE)")
    if needs_campaign and not _SLUG.match(campaign):
        raise InputError(f"{where}: {campaign!r} is not a campaign name")
    values = tuple(v.strip() for v in raw.split(","))
    for value in values:
        if allowed is not None and value.lower() not in allowed:
            raise InputError(
                f"{where}: {value!r} is not a {key} value (one of: {', '.join(allowed)})"
            )
        if allowed is None and not _COUNTRY.match(value):
            raise InputError(f"{where}: {value!r} is not a two-letter country code")
    normal = tuple(dict.fromkeys(v.upper() if key == "country" else v.lower() for v in values))
    return Filter(key, normal, campaign)


def parse_filters(texts: Sequence[str]) -> tuple[Filter, ...]:
    return tuple(parse_filter(text) for text in texts)


def member_conditions(
    session: Connection | Session, filters: Sequence[Filter], exclude_segments: Sequence[str] = ()
) -> list[ColumnElement[bool]]:
    """SQL conditions on ``recipients`` for the filters and the excluded segments (all must
    hold). InputError for a campaign never sent (no delivery log) or an unknown segment."""
    conditions: list[ColumnElement[bool]] = []
    campaigns: dict[str, tuple[int, str]] = {}
    for f in filters:
        if f.campaign and f.campaign not in campaigns:
            row = session.execute(
                select(Campaign.id, Campaign.kind).where(Campaign.slug == f.campaign)
            ).first()
            if row is None:
                known = ", ".join(session.scalars(select(Campaign.slug).order_by(Campaign.slug)))
                raise InputError(
                    f"--where {str(f)!r}: unknown campaign {f.campaign!r}: it has no delivery "
                    f"log (campaigns sent or planned: {known or 'none'})"
                )
            campaigns[f.campaign] = (row.id, row.kind)
        conditions.append(_condition(f, campaigns.get(f.campaign)))
    if exclude_segments:
        found = dict(
            session.execute(
                select(Segment.slug, Segment.id).where(Segment.slug.in_(exclude_segments))
            ).all()
        )
        for slug in exclude_segments:
            if slug not in found:
                known = ", ".join(session.scalars(select(Segment.slug).order_by(Segment.slug)))
                raise InputError(
                    f"--exclude-segment: unknown segment {slug!r} (known: {known or 'none'})"
                )
        # An alias: the member queries join recipient_segments themselves.
        excluded = _members.alias("excluded_members")
        conditions.append(
            ~exists().where(
                excluded.c.recipient_id == Recipient.id,
                excluded.c.segment_id.in_([found[slug] for slug in exclude_segments]),
            )
        )
    return conditions


def _condition(f: Filter, campaign: tuple[int, str] | None) -> ColumnElement[bool]:
    if f.key == "language":
        return Recipient.language.in_(f.values)
    if f.key == "country":
        return Recipient.country.in_(f.values)
    assert campaign is not None
    campaign_id, kind = campaign
    if f.key == "rsvp":
        if kind != CampaignKind.INVITATION:
            raise InputError(
                f"--where {str(f)!r}: {f.campaign!r} is a {kind}, not an invitation: "
                "it has no answers"
            )
        answered = tables.rsvps.alias()
        mine = (answered.c.campaign_id == campaign_id) & (answered.c.recipient_id == Recipient.id)
        answers = [v for v in f.values if v != "none"]
        options: list[ColumnElement[bool]] = []
        if answers:
            options.append(exists().where(mine, answered.c.answer.in_(answers)))
        if "none" in f.values:
            options.append(~exists().where(mine))
        return or_(*options)
    # status: the recipient's delivery in that campaign has one of these states.
    other = tables.deliveries.alias()
    return exists().where(
        other.c.campaign_id == campaign_id,
        other.c.recipient_id == Recipient.id,
        other.c.status.in_(f.values),
    )


__all__ = ["Filter", "member_conditions", "parse_filter", "parse_filters"]
