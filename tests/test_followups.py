"""Follow-ups by what happened: `send --where` (rsvp, status, language, country) and
`--exclude-segment`, their one-line errors, the dry run's count per segment, and a
reminder over a real SMTP server to exactly those who did not answer the invitation."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from sqlalchemy import insert, select, update

from clara_mailer.compose.render import message_parts, parse_message
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.plan.filters import Filter, parse_filter
from clara_mailer.store.database import Database
from clara_mailer.store.models import (
    Campaign,
    Delivery,
    Recipient,
    Segment,
    recipient_segments,
    utcnow,
)
from clara_mailer.web.app import create_app
from tests.smtp_server import RecordingSMTPServer
from tests.web_server import serve_in_thread

Cli = Callable[..., Result]
INVITATION = "conference-2022-02-04"
REMINDER = "reminder-2022-02-04"
FOOTER = {
    "sender_legal_name": "CLARA test consortium",
    "sender_postal_address": "Calle Mayor 1, 28013 Madrid, Spain",
    "controller_contact": "dpo@clara.example",
    "privacy_url": "https://clara.example/privacy",
}
# (address, language, country, segments)
PEOPLE = [
    ("ana@getafe.example", "es", "ES", ("local-police",)),
    ("bea@leganes.example", "es", "ES", ("local-police",)),
    ("carl@bradford.example", "en", "GB", ("local-police",)),
    ("dora@elche.example", "es", "ES", ("local-police", "associations")),
    ("eve@porto.example", "en", "PT", ("local-police",)),
    ("fran@malaga.example", "es", "ES", ("local-police",)),
    ("gus@ngo.example", "en", "ES", ("associations",)),
]


@pytest.fixture
def smtp() -> Iterator[RecordingSMTPServer]:
    yield from RecordingSMTPServer.fixture()


@pytest.fixture
def settings(settings: Settings, smtp: RecordingSMTPServer, tmp_path: Path) -> Settings:
    """Over SMTP, with the legal footer, and a templates folder holding a reminder: a copy
    of the invitation with its own subjects."""
    templates = tmp_path / "email"
    shutil.copytree(EMAIL_TEMPLATES, templates)
    shutil.copytree(templates / INVITATION, templates / REMINDER)
    toml = templates / REMINDER / "campaign.toml"
    text = toml.read_text(encoding="utf-8")
    text = text.replace('subject = "Invitación:', 'subject = "Recordatorio:')
    text = text.replace('subject = "Invitation:', 'subject = "Reminder:')
    toml.write_text(text, encoding="utf-8")
    return dataclasses.replace(settings, **FOOTER, smtp_url=smtp.url(), templates_dir=templates)


def add_people(db: Database) -> dict[str, int]:
    now = utcnow()
    ids = {}
    with db.session() as s:
        segments = dict(s.execute(select(Segment.slug, Segment.id)).all())
        for address, language, country, member_of in PEOPLE:
            ids[address] = s.execute(
                insert(Recipient)
                .values(
                    email=address,
                    email_key=address,
                    name=address.split("@")[0].title(),
                    organisation="",
                    language=language,
                    country=country,
                    consent_source="test",
                    created_at=now,
                    updated_at=now,
                )
                .returning(Recipient.id)
            ).scalar_one()
            for slug in member_of:
                s.execute(
                    insert(recipient_segments).values(
                        recipient_id=ids[address], segment_id=segments[slug]
                    )
                )
    return ids


def received(server: RecordingSMTPServer, subject_start: tuple[str, ...]) -> list[str]:
    out = []
    for message in server.messages:
        if str(parse_message(message.data)["Subject"]).startswith(subject_start):
            out.extend(message.recipients)
    return sorted(out)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def test_reminder_reaches_exactly_those_who_did_not_answer(
    cli: Cli, db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    add_people(db)
    police = [p[0] for p in PEOPLE if "local-police" in p[3]]
    ok(cli("send", INVITATION, "--segment", "local-police", "--yes"))
    invited = received(smtp, ("Invitación", "Invitation"))
    assert invited == sorted(police)

    # Answers through the web pages, from each recipient's own links.
    answers = {"ana@getafe.example": "yes", "carl@bradford.example": "yes"}
    answers["bea@leganes.example"] = "no"
    with (
        serve_in_thread(create_app(Mailer(settings))) as base_url,
        httpx.Client(base_url=base_url, timeout=10) as http,
    ):
        for message in smtp.messages:
            [to] = message.recipients
            if to not in answers:
                continue
            _, html = message_parts(message.data)
            answer = answers[to]
            link = re.search(rf'href="{re.escape(settings.base_url)}(/r/[a-z2-7]+)\?answer=', html)
            assert link, to
            assert http.get(f"{link.group(1)}?answer={answer}").status_code == 200
            assert http.post(link.group(1), data={"answer": answer}).status_code == 200

    none = f"rsvp=none:{INVITATION}"
    dry = ok(cli("send", REMINDER, "--segment", "local-police", "--where", none, "--dry-run"))
    assert "local-police: 3 message(s) rendered" in dry.output
    yes = ok(
        cli(
            "send",
            REMINDER,
            "--segment",
            "local-police",
            "--where",
            f"rsvp=yes:{INVITATION}",
            "--dry-run",
        )
    )
    assert "local-police: 2 message(s) rendered" in yes.output

    before = len(smtp.messages)
    sent = ok(cli("send", REMINDER, "--segment", "local-police", "--where", none, "--yes"))
    assert "3 sent" in sent.output
    reminded = sorted(r for m in smtp.messages[before:] for r in m.recipients)
    assert reminded == sorted(set(police) - set(answers))
    assert received(smtp, ("Recordatorio", "Reminder")) == reminded
    again = ok(cli("send", REMINDER, "--segment", "local-police", "--where", none, "--yes"))
    assert "Nothing to send." in again.output
    assert len(smtp.messages) == before + 3


def test_where_by_status_language_country_and_excluded_segment(
    cli: Cli, db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    ids = add_people(db)
    newsletter = "newsletter-2022-01"
    ok(cli("send", newsletter, "--segment", "local-police", "--yes"))
    # What a later bounce and a refusal would have left (the bounce and 5xx paths have
    # their own tests): carl bounced, eve failed.
    with db.session() as s:
        for address, status in (
            ("carl@bradford.example", "bounced"),
            ("eve@porto.example", "failed"),
        ):
            s.execute(
                update(Delivery).where(Delivery.recipient_id == ids[address]).values(status=status)
            )

    def dry(*args: str) -> str:
        return ok(
            cli(
                "send",
                REMINDER,
                "--segment",
                "local-police",
                "--segment",
                "associations",
                "--dry-run",
                *args,
            )
        ).output

    out = dry("--where", f"status=failed,bounced:{newsletter}")
    assert "local-police: 2 message(s) rendered" in out
    assert "associations: 0 message(s) rendered" in out  # every segment is shown
    assert "local-police: 1 " in dry("--where", f"status=failed:{newsletter}")
    # not reached by the newsletter at all: gus (associations only) has no row in it
    out = dry("--where", f"status=sent:{newsletter}", "--where", "language=es")
    assert "local-police: 4 message(s) rendered" in out
    out = dry("--where", "language=en")
    assert "local-police: 2 message(s) rendered" in out and "associations: 1 " in out
    out = dry("--where", "country=gb,pt")
    assert "local-police: 2 message(s) rendered" in out and "associations: 0 " in out
    out = dry("--exclude-segment", "associations")
    assert "local-police: 5 message(s) rendered" in out and "associations: 0 " in out
    out = dry("--where", "country=ES", "--exclude-segment", "associations")
    assert "local-police: 3 message(s) rendered" in out

    # The real send writes rows for exactly those: resend to the two it did not reach.
    before = len(smtp.messages)
    ok(
        cli(
            "send",
            REMINDER,
            "--segment",
            "local-police",
            "--where",
            f"status=failed,bounced:{newsletter}",
            "--yes",
        )
    )
    assert sorted(r for m in smtp.messages[before:] for r in m.recipients) == [
        "carl@bradford.example",
        "eve@porto.example",
    ]
    with db.session() as s:
        planned = s.scalars(
            select(Delivery.email).join(Campaign).where(Campaign.slug == REMINDER)
        ).all()
    assert sorted(e or "" for e in planned) == ["carl@bradford.example", "eve@porto.example"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--where", "colour=blue"], "unknown key 'colour'"),
        (["--where", "rsvp"], "write KEY=VALUE"),
        (["--where", "rsvp=maybe:conference-2022-02-04"], "'maybe' is not a rsvp value"),
        (["--where", "rsvp=yes"], "name the campaign"),
        (["--where", "status=lost:newsletter-2022-01"], "'lost' is not a status value"),
        (["--where", "language=fr"], "'fr' is not a language value"),
        (["--where", "country=ESP"], "'ESP' is not a two-letter country code"),
        (["--where", "language=es:newsletter-2022-01"], "language takes no campaign"),
        (["--where", "rsvp=none:no-such-campaign"], "unknown campaign 'no-such-campaign'"),
        (["--where", "status=sent:press-release-2022-02-04"], "unknown campaign"),
        (["--where", "rsvp=none:newsletter-2022-01"], "not an invitation"),
        (["--exclude-segment", "nope"], "unknown segment 'nope'"),
    ],
)
@pytest.mark.parametrize("mode", ["--dry-run", "--yes"])
def test_filter_errors_are_one_line_exit_2(
    cli: Cli, db: Database, settings: Settings, args: list[str], says: str, mode: str
) -> None:
    add_people(db)
    ok(cli("send", "newsletter-2022-01", "--segment", "associations", "--yes"))
    result = cli("send", "newsletter-2022-01", "--segment", "local-police", mode, *args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    assert says in result.output
    with db.session() as s:  # nothing planned for local-police
        segments = s.scalars(select(Delivery.segment).distinct()).all()
    assert segments == ["associations"]


def test_parse_filter_normalises() -> None:
    assert parse_filter("RSVP=Yes,none:conference-2022-02-04") == Filter(
        "rsvp", ("yes", "none"), "conference-2022-02-04"
    )
    assert parse_filter("country=gb") == Filter("country", ("GB",))
    assert str(parse_filter("status=failed,bounced:x-1")) == "status=failed,bounced:x-1"
