"""The calendar entry of an invitation (iCalendar, built with ``icalendar``).

METHOD:PUBLISH, not REQUEST: a REQUEST asks the client to send an iTIP reply to the
organiser and must name the recipient as ATTENDEE; answers come through the RSVP links
instead, and the entry is the same for every recipient (built once per language).
The UID depends only on the campaign, so a resend updates the entry instead of adding one.
"""

from __future__ import annotations

import datetime as dt

from clara_mailer.compose.campaigns import CampaignDef

PRODID = "-//CLARA project//clara-mail//EN"
ICS_FILENAME = "invite.ics"


def event_uid(defn: CampaignDef) -> str:
    return f"{defn.slug}@{defn.sender_domain}"


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
    event.add("location", vText(f"{event_def.place[language]}, {event_def.address}"))
    event.add("description", description)
    organiser = vCalAddress(f"mailto:{event_def.organiser_email}")
    organiser.params["cn"] = vText(event_def.organiser)
    event.add("organizer", organiser)
    event.add("status", "CONFIRMED")
    event.add("transp", "OPAQUE")
    cal.add_component(event)
    cal.add_missing_timezones()  # VTIMEZONE for Europe/Madrid: Outlook needs it
    return bytes(cal.to_ical())
