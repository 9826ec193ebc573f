"""Rendering: every variant parsed back and checked against STANDARDS.md, hostile
recipients, and the fast path against the EmailMessage reference."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.policy
import re
from email.message import EmailMessage
from zoneinfo import ZoneInfo

import pytest
from icalendar import Calendar

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.headers import wire_address
from clara_mailer.compose.render import (
    RecipientView,
    Renderer,
    clean_field,
    compare_renders,
    message_parts,
    parse_message,
    raw_headers,
    rfc2047_addresses,
)
from clara_mailer.core.errors import NeedsSMTPUTF8, UnsendableRecipient
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner

SECRET = "test-secret-key-0123456789abcdef"
CAMPAIGNS = ["newsletter-2022-01", "conference-2022-02-04", "press-release-2022-02-04"]
SEGMENTS = ["national-authorities", "local-police", "associations", "city-networks", "media", ""]
SETTINGS = Settings(
    secret_key=SECRET,
    base_url="https://clara.example",
    templates_dir=EMAIL_TEMPLATES,
)
SIGNER = TokenSigner(SECRET)


def renderer(slug: str) -> Renderer:
    return Renderer(load_campaign(SETTINGS, slug), SETTINGS, SIGNER, 12)


def person(**kw: object) -> RecipientView:
    base = dict(
        id=7,
        email="ines.garcia@policia-getafe.example",
        name="Inés García Muñoz",
        organisation="Policía Local de Getafe",
        language="es",
        segment="local-police",
    )
    base.update(kw)
    return RecipientView(**base)  # type: ignore[arg-type]


VARIANTS = [(slug, lang, seg) for slug in CAMPAIGNS for lang in ("es", "en") for seg in SEGMENTS]


@pytest.fixture(scope="module")
def renderers() -> dict[str, Renderer]:
    return {slug: renderer(slug) for slug in CAMPAIGNS}


@pytest.mark.parametrize(("slug", "language", "segment"), VARIANTS)
def test_every_variant_meets_the_message_standards(
    renderers: dict[str, Renderer], slug: str, language: str, segment: str
) -> None:
    r = renderers[slug]
    data = r.render(person(language=language, segment=segment))
    # CRLF only, no line over 998 octets (RFC 5322 2.1.1).
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii()  # 7-bit: encoded words and quoted-printable

    msg = parse_message(data)
    for header in ("Date", "From", "To", "Subject", "Message-ID", "MIME-Version", "Reply-To"):
        assert msg[header], header
    assert msg["Auto-Submitted"] == "auto-generated"
    defn = r.defn
    assert msg["List-Id"] == f"{defn.list_name} <{defn.list_id}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    raw_lu = re.search(rb"^List-Unsubscribe: .*?\r\n(?! )", data, re.M | re.S)
    assert raw_lu and b"=?" not in raw_lu.group(0)
    token = SIGNER.sign("u", 12, 7)
    assert str(msg["List-Unsubscribe"]).split() == [
        f"<https://clara.example/u/{token}>,",
        f"<mailto:{defn.unsubscribe_address}?subject=unsubscribe-{token}>",
    ]
    assert msg["Message-ID"] == r.message_id(person())
    assert msg["Message-ID"].endswith(f"@{defn.sender_domain}>")
    assert msg["To"].addresses[0].display_name == "Inés García Muñoz"
    assert msg["From"].addresses[0].display_name == defn.display_name(language)
    assert msg["Subject"] == defn.subjects[language]
    assert re.search(rb"^Subject: =\?utf-8\?", data, re.M) or defn.subjects[language].isascii()

    alternative = msg if defn.event is None else msg.get_payload()[0]
    assert alternative.get_content_type() == "multipart/alternative"
    parts = alternative.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
    text, html = message_parts(data)
    # Accents intact, personal fields present, visible unsubscribe link in both parts.
    assert "Inés García Muñoz" in text and "Inés García Muñoz" in html
    assert f"https://clara.example/u/{token}" in text
    assert f'href="https://clara.example/u/{token}"' in html
    # The hidden preheader is in the HTML but not in the text.
    preheader = defn.preheaders[language]
    assert preheader in html and preheader not in text
    # CSS inlined, @media kept in a <style> block.
    assert 'style="' in html and "@media" in html
    assert "Leganés" in text and "Leganés" in html
    # The legal footer: the partners (all of them), the co-funding and why this address.
    assert "Bradford Hate Crime Alliance" in text and "847508" in text


def test_newsletter_segment_paragraph_and_size(renderers: dict[str, Renderer]) -> None:
    r = renderers["newsletter-2022-01"]
    notes = r.defn.data["segment_notes"]
    texts = {seg: message_parts(r.render(person(segment=seg)))[0] for seg in SEGMENTS}
    for seg, text in texts.items():
        note = notes.get(seg, notes["default"])["es"]
        assert " ".join(note.split()[:8]) in " ".join(text.split()), seg
    assert len(set(texts.values())) == len({s if s in notes else "default" for s in SEGMENTS})
    text, html = message_parts(r.render(person(language="en")))
    for fact in ("136", "65", "21", "Bradford", "West Yorkshire Police"):
        assert fact in text
    website = r.defn.project["website"]
    assert website in text and website in html
    assert 20_000 <= len(r.render(person(language="en"))) <= 60_000


def test_invitation_calendar_part(renderers: dict[str, Renderer]) -> None:
    r = renderers["conference-2022-02-04"]
    msgs = [
        parse_message(r.render(person(id=i, language=lang))) for i, lang in ((1, "es"), (2, "en"))
    ]
    uids = []
    for msg in msgs:
        assert msg.get_content_type() == "multipart/mixed"
        cal_part = msg.get_payload()[1]
        assert cal_part.get_content_type() == "text/calendar"
        assert cal_part.get_param("method") == "PUBLISH"
        assert cal_part.get_filename() == "invite.ics"
        cal = Calendar.from_ical(cal_part.get_payload(decode=True))
        assert cal["METHOD"] == "PUBLISH"
        (event,) = cal.walk("VEVENT")
        start = event.decoded("DTSTART")
        assert start == dt.datetime(2022, 2, 4, 10, 30, tzinfo=ZoneInfo("Europe/Madrid"))
        assert str(start.tzinfo) == "Europe/Madrid"
        assert event.decoded("DTEND") == dt.datetime(
            2022, 2, 4, 13, 50, tzinfo=ZoneInfo("Europe/Madrid")
        )
        assert cal.walk("VTIMEZONE")
        uids.append(str(event["UID"]))
    assert uids[0] == uids[1] == f"conference-2022-02-04@{r.defn.sender_domain}"
    # A re-render (a resend) carries the same UID and Message-ID.
    again = parse_message(renderer("conference-2022-02-04").render(person(id=1)))
    cal = Calendar.from_ical(again.get_payload()[1].get_payload(decode=True))
    assert str(cal.walk("VEVENT")[0]["UID"]) == uids[0]
    assert again["Message-ID"] == msgs[0]["Message-ID"]
    text, html = message_parts(r.render(person()))
    yes = f"https://clara.example/r/{SIGNER.sign('r', 12, 7)}?answer=yes"
    assert yes in text and yes.replace("?", "?") in html
    assert "10:30" in text and "Clausura de la jornada" in text


def test_script_in_fields_is_escaped(renderers: dict[str, Renderer]) -> None:
    r = renderers["newsletter-2022-01"]
    data = r.render(
        person(name="<script>alert(1)</script>", organisation="<img src=x onerror=alert(2)>")
    )
    text, html = message_parts(data)
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" in text  # plain text is not markup
    assert parse_message(data)["To"].addresses[0].display_name == "<script>alert(1)</script>"


def test_crlf_and_bcc_in_name_cannot_start_a_header(renderers: dict[str, Renderer]) -> None:
    r = renderers["conference-2022-02-04"]
    data = r.render(
        person(name="Eve\r\nBcc: victim@evil.example\r\n", organisation="X\nTo: a@b.example")
    )
    head = data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"^Bcc:", head, re.M | re.I)
    assert len(re.findall(rb"^To:", head, re.M)) == 1
    msg = parse_message(data)
    assert msg["Bcc"] is None
    assert msg["To"].addresses[0].display_name == "Eve Bcc: victim@evil.example"
    assert msg["To"].addresses[0].addr_spec == "ines.garcia@policia-getafe.example"


def test_ten_thousand_character_organisation(renderers: dict[str, Renderer]) -> None:
    r = renderers["newsletter-2022-01"]
    org = "Asociación " + "ñ" * 9_989
    long_name = "Ä" * 3000
    data = r.render(person(organisation=org, name=long_name))
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    raw_to = re.search(rb"^To: .*?\r\n(?! )", data, re.M | re.S)
    assert raw_to
    assert rfc2047_addresses(raw_to.group(0)[4:].decode()) == [
        (long_name, "ines.garcia@policia-getafe.example")
    ]
    assert all(len(w) <= 75 for w in re.findall(rb"=\?utf-8\?b\?[^?]*\?=", data))
    text, html = message_parts(data)
    assert org in text and org in html


HOSTILE = [
    person(),
    person(id=1, name="", organisation="", segment="associations"),
    person(id=2, name="<script>x</script>", organisation="A & B <C>", language="en"),
    person(id=3, name='O\'Brien, "Jr." \\ {0} {name}', organisation="{}{{}}%s"),
    person(id=4, name="Eve\r\nBcc: x@evil.example", organisation="\x00\x1b[31m\u2028red"),
    person(id=5, name="Zoë Ñ" * 400, organisation="ñ" * 10_000, segment="national-authorities"),
    person(id=6, name="ZQX0qclaraXQZ", organisation="ZQX3qclaraXQZ", language="en"),
    person(id=7, email="josé@münchen.example", name="José", segment="unknown-segment"),
    person(id=8, email="a&b'c@xn--mnchen-3ya.example", name="  spaced   out  ", language="en"),
    person(id=9, name="\u00a0nbsp\u00a0", organisation="tab\tand\nnewline", language="fr"),
]


@pytest.mark.parametrize("slug", CAMPAIGNS)
def test_fast_path_equals_reference(slug: str) -> None:
    r = renderer(slug)
    recipients = [dataclasses.replace(h, id=h.id + 100 * i) for i in range(3) for h in HOSTILE]
    for rv in recipients:
        for smtputf8 in (False, True):
            if not smtputf8 and not rv.email.split("@")[0].isascii():
                continue
            fast = r.render(rv, smtputf8=smtputf8)
            reference = r.render_reference(rv, smtputf8=smtputf8)
            # To is checked against the recipient itself: Python's own folder drops the
            # space between encoded-words of a long name (RFC 2047 6.2), so it can't judge.
            assert compare_renders(fast, reference, skip=("to",)) == []
            (to,) = [v for k, v in raw_headers(fast) if k == "To"]
            address = rv.email if smtputf8 else wire_address(rv.email, smtputf8=False)
            assert rfc2047_addresses(to) == [(clean_field(rv.name), address)]
            if len(rv.name) < 40:  # short names: Python's folding is right, compare too
                assert compare_renders(fast, reference) == []


def test_compare_renders_notices_a_difference() -> None:
    r = renderer("newsletter-2022-01")
    a = r.render(person())
    assert compare_renders(a, r.render(person(name="Someone Else"))) != []


def test_display_name_that_looks_like_an_encoded_word_stays_literal() -> None:
    data = renderer("newsletter-2022-01").render(person(name="=?utf-8?q?Boss?="))
    assert parse_message(data)["To"].addresses[0].display_name == "=?utf-8?q?Boss?="


def test_non_ascii_local_part_needs_smtputf8() -> None:
    r = renderer("newsletter-2022-01")
    rv = person(email="josé@ejemplo.example")
    with pytest.raises(NeedsSMTPUTF8, match="SMTPUTF8"):
        r.render(rv)
    data = r.render(rv, smtputf8=True)
    assert "To: Inés García Muñoz <josé@ejemplo.example>".encode() in data
    msg = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert isinstance(msg, EmailMessage)
    assert msg["Subject"] == r.defn.subjects["es"]


def test_idn_domain_goes_out_as_ascii() -> None:
    r = renderer("newsletter-2022-01")
    data = r.render(person(email="ana@münchen.example"))
    assert parse_message(data)["To"].addresses[0].addr_spec == "ana@xn--mnchen-3ya.example"
    text, _ = message_parts(data)
    assert "ana@münchen.example" in text  # shown to the reader as given


@pytest.mark.parametrize("bad", ["no-at-sign", "a b@c.example", "a@b.example>\r\nBcc: x", ""])
def test_unusable_address_is_refused(bad: str) -> None:
    with pytest.raises(UnsendableRecipient):
        renderer("newsletter-2022-01").render(person(email=bad))


def test_message_id_stable_and_distinct() -> None:
    a, b = renderer("newsletter-2022-01"), renderer("newsletter-2022-01")
    assert a.message_id(person()) == b.message_id(person())
    assert a.message_id(person()) != a.message_id(person(id=8))
    assert a.message_id(person()) != renderer("conference-2022-02-04").message_id(person())
