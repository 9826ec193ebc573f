"""The calendar entry of an invitation (iCalendar, built with ``icalendar``).

METHOD:PUBLISH, not REQUEST: a REQUEST asks the client to send an iTIP reply to the
organiser and must name the recipient as ATTENDEE; answers come through the RSVP links
instead, and the entry is the same for every recipient (built once per language).
The UID depends only on the campaign, so a resend updates the entry instead of adding one.

The VTIMEZONE is two RRULE observances (STANDARD, DAYLIGHT) derived from zoneinfo's
transitions in the event's year, not icalendar's ``add_missing_timezones`` list of dated
RDATEs, which some Outlook versions mishandle.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from clara_mailer.compose.campaigns import CampaignDef

if TYPE_CHECKING:
    from icalendar import Timezone

PRODID = "-//CLARA project//clara-mail//EN"
ICS_FILENAME = "invite.ics"


def event_uid(defn: CampaignDef) -> str:
    return f"{defn.slug}@{defn.sender_domain}"


_WEEKDAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
#: The year the observances start in (the rule's own date that year), as most tools write.
_RULE_EPOCH = 1970


def _transitions(zone: ZoneInfo, year: int) -> list[dt.datetime]:
    """The UTC instants in ``year`` at which ``zone``'s offset changes (to the minute)."""

    def offset(at: dt.datetime) -> dt.timedelta | None:
        return at.astimezone(zone).utcoffset()

    found = []
    day = dt.datetime(year, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC)
    while day < end:
        following = day + dt.timedelta(days=1)
        if offset(day) != offset(following):
            low, high = day, following  # offset(low) != offset(high): bisect to a minute
            while high - low > dt.timedelta(minutes=1):
                middle = low + (high - low) / 2
                middle = middle.replace(second=0, microsecond=0)
                if middle <= low:
                    break
                if offset(middle) == offset(low):
                    low = middle
                else:
                    high = middle
            found.append(high)
        day = following
    return found


def _nth_weekday(date: dt.date) -> str:
    """BYDAY for ``date``: -1SU for a last Sunday, 2SU for a second one, and so on."""
    next_month = (date.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    if (date + dt.timedelta(days=7)) >= next_month:
        return f"-1{_WEEKDAYS[date.weekday()]}"
    return f"{(date.day - 1) // 7 + 1}{_WEEKDAYS[date.weekday()]}"


def _rule_date(year: int, month: int, byday: str) -> dt.date:
    """The date ``byday`` (e.g. -1SU) names in ``month`` of ``year``."""
    weekday = _WEEKDAYS.index(byday[-2:])
    nth = int(byday[:-2])
    first = dt.date(year, month, 1)
    if nth > 0:
        shift = (weekday - first.weekday()) % 7
        return first + dt.timedelta(days=shift + 7 * (nth - 1))
    last = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


def vtimezone(zone: ZoneInfo, year: int) -> Timezone:
    """A VTIMEZONE for ``zone`` with one RRULE per observance, as in force in ``year``.

    A zone without a change that year gets one STANDARD observance and no rule.
    """
    from icalendar import Timezone, TimezoneDaylight, TimezoneStandard

    tz = Timezone()
    tz.add("tzid", zone.key)
    changes = _transitions(zone, year)
    if len(changes) != 2:
        # No DST that year (or an irregular year): the offset in force at its start.
        at = dt.datetime(year, 1, 1, tzinfo=dt.UTC).astimezone(zone)
        only = TimezoneStandard()
        only.add("dtstart", dt.datetime(_RULE_EPOCH, 1, 1))
        only.add("tzoffsetfrom", at.utcoffset())
        only.add("tzoffsetto", at.utcoffset())
        only.add("tzname", at.tzname())
        tz.add_component(only)
        return tz
    for change in changes:
        before = (change - dt.timedelta(minutes=1)).astimezone(zone)
        after = change.astimezone(zone)
        assert before.utcoffset() is not None and after.utcoffset() is not None
        # The onset as the wall clock showed it just before: 02:00 for Madrid in March.
        onset = change.astimezone(dt.timezone(before.utcoffset() or dt.timedelta()))
        byday = _nth_weekday(onset.date())
        first = _rule_date(_RULE_EPOCH, onset.month, byday)
        daylight = bool(after.dst())
        part = TimezoneDaylight() if daylight else TimezoneStandard()
        part.add("dtstart", dt.datetime.combine(first, onset.time().replace(tzinfo=None)))
        part.add("rrule", {"freq": "yearly", "bymonth": onset.month, "byday": byday})
        part.add("tzoffsetfrom", before.utcoffset())
        part.add("tzoffsetto", after.utcoffset())
        part.add("tzname", after.tzname())
        tz.add_component(part)
    return tz


def event_ics(defn: CampaignDef, language: str, description: str) -> bytes:
    """The VCALENDAR for ``defn``'s event in ``language`` (CRLF lines, UTF-8)."""
    # Imported here: only invitations need it, and it costs a newsletter send ~3 MB.
    from icalendar import Calendar, Event, vCalAddress, vText

    event_def = defn.event
    if event_def is None:
        raise ValueError(f"campaign {defn.slug} has no event")
    cal = Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("method", "PUBLISH")
    event = Event()
    event.add("uid", event_uid(defn))
    event.add("sequence", event_def.sequence)
    event.add("dtstamp", event_def.stamp.astimezone(dt.UTC))
    event.add("dtstart", event_def.start)
    event.add("dtend", event_def.end)
    event.add("summary", event_def.title[language])
    event.add("location", vText(defn.location(language)))
    event.add("description", description)
    organiser = vCalAddress(f"mailto:{event_def.organiser_email}")
    organiser.params["cn"] = vText(event_def.organiser)
    event.add("organizer", organiser)
    event.add("status", "CONFIRMED")
    event.add("transp", "OPAQUE")
    zone = event_def.start.tzinfo
    if isinstance(zone, ZoneInfo):  # Outlook needs the VTIMEZONE
        cal.add_component(vtimezone(zone, event_def.start.year))
    cal.add_component(event)
    return bytes(cal.to_ical())
