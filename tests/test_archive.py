"""The public archive: /archive and /archive/SLUG/LANG served by the web app, the "view in
browser" link of every message, and `clara-mail archive build DIR`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from sqlalchemy import insert, select

from clara_mailer.compose.render import message_parts, parse_message
from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Recipient, Segment, recipient_segments, utcnow
from clara_mailer.web.app import create_app
from tests.web_server import serve_in_thread

Cli = Callable[..., Result]
SENT = ("newsletter-2022-01", "conference-2022-02-04")
NOT_SENT = "press-release-2022-02-04"
FOOTER = {
    "sender_legal_name": "Remitente de Prueba S.A.",
    "sender_postal_address": "Calle de Prueba 1, 00000 Ciudad de Prueba",
    "controller_contact": "dpd@responsable-prueba.example",
    "privacy_url": "https://privacidad-prueba.example/aviso",
}
# Distinctive personal data: none of it may appear on a public page.
PEOPLE = [
    ("zacarias.quintanilla@villaprueba.example", "Zacarías Quintanilla", "Ayto. Villaprueba", "es"),
    ("wilhelmina.oddfellow@testshire.example", "Wilhelmina Oddfellow", "Testshire Council", "en"),
    ("xoana.iglesario@concello.example", "Xoana Iglesario", "Concello de Probas", "es"),
    ("yusuf.kettlebridge@bridgeton.example", "", "Bridgeton Hate Crime Desk", "en"),
]
SOURCE = "lista interna de la oficina Quirinal"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, **FOOTER)


def add_people(db: Database, segment: str = "local-police") -> None:
    now = utcnow()
    with db.session() as s:
        segment_id = s.scalar(select(Segment.id).where(Segment.slug == segment))
        for address, name, organisation, language in PEOPLE:
            recipient_id = s.execute(
                insert(Recipient)
                .values(
                    email=address,
                    email_key=address.casefold(),
                    name=name,
                    organisation=organisation,
                    language=language,
                    country="ES",
                    consent_source=SOURCE,
                    created_at=now,
                    updated_at=now,
                )
                .returning(Recipient.id)
            ).scalar_one()
            s.execute(
                insert(recipient_segments).values(recipient_id=recipient_id, segment_id=segment_id)
            )


@pytest.fixture
def sent(db: Database, settings: Settings) -> list[bytes]:
    """Both campaigns sent to the people through the outbox; the messages written."""
    add_people(db)
    mailer = Mailer(settings, database=db)
    options = SendOptions(segments=("local-police",))
    for slug in SENT:
        summary = mailer.send(mailer.plan(slug, options), options, handle_signals=False)
        assert summary.counts == {"sent": len(PEOPLE)}
    messages = sorted(settings.outbox_dir.rglob("*.eml"))
    assert len(messages) == len(SENT) * len(PEOPLE)
    return [path.read_bytes() for path in messages]


@pytest.fixture
def client(settings: Settings, sent: list[bytes]) -> Iterator[httpx.Client]:
    with (
        serve_in_thread(create_app(Mailer(settings))) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as http,
    ):
        yield http


def tokens_of(messages: list[bytes]) -> set[str]:
    """Every unsubscribe and RSVP token the messages carry."""
    found = set()
    for data in messages:
        text, html = message_parts(data)
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        for part in (text, html, head):
            found.update(re.findall(r"/[ur]/([a-z2-7]+)", part))
    return found


def view_link(data: bytes) -> str:
    _, html = message_parts(data)
    match = re.search(
        r'<a href="([^"]+)"[^>]*>(?:Ver en el navegador|View in your browser)</a>', html
    )
    assert match, "no view-in-browser link"
    return match.group(1)


def test_archive_pages_hold_no_personal_data(client: httpx.Client, sent: list[bytes]) -> None:
    tokens = tokens_of(sent)
    assert len(tokens) >= len(SENT) * len(PEOPLE)  # the check below looks for something
    personal = {SOURCE} | {v for person in PEOPLE for v in person[:3] if v}
    personal |= {address.split("@")[0] for address, *_ in PEOPLE}

    index = client.get("/archive")
    assert index.status_code == 200
    for slug in SENT:
        for language in ("es", "en"):
            assert f'href="archive/{slug}/{language}"' in index.text
    assert NOT_SENT not in index.text
    assert "Conferencia Final de CLARA" in index.text  # the subjects are the titles

    pages = [index.text]
    for slug in SENT:
        for language in ("es", "en"):
            response = client.get(f"/archive/{slug}/{language}")
            assert response.status_code == 200, (slug, language)
            assert response.headers["content-type"].startswith("text/html")
            page = response.text
            assert f'<html lang="{language}">' in page
            assert ("versión web" if language == "es" else "web version") in page
            # The legal footer stays; the personal lines and every per-recipient link go.
            assert FOOTER["sender_legal_name"] in page
            assert FOOTER["controller_contact"] in page
            assert "Ha recibido este mensaje en" not in page
            assert "You received this message at" not in page
            assert "/u/" not in page and "/r/" not in page
            assert "Ver en el navegador" not in page and "View in your browser" not in page
            pages.append(page)
    for page in pages:
        for value in personal:
            assert value not in page
        for token in tokens:
            assert token not in page
        assert "@villaprueba" not in page and "ZQX" not in page


def test_every_messages_view_in_browser_link_resolves(
    client: httpx.Client, sent: list[bytes], settings: Settings
) -> None:
    seen = set()
    for data in sent:
        url = view_link(data)
        text, _ = message_parts(data)
        assert url in text  # the text part has it too
        to = parse_message(data)["To"].addresses[0].addr_spec
        language = next(lang for address, *_, lang in PEOPLE if address == to)
        assert url.startswith(settings.base_url + "/archive/")
        path = url.removeprefix(settings.base_url)
        assert path.rsplit("/", 1)[1] == language
        response = client.get(path)
        assert response.status_code == 200, url
        seen.add(path)
    assert seen == {f"/archive/{slug}/{lang}" for slug in SENT for lang in ("es", "en")}


def test_unknown_campaign_or_language_is_a_404_page(client: httpx.Client) -> None:
    for path in (
        "/archive/no-such-campaign/es",
        f"/archive/{NOT_SENT}/es",  # defined, never sent
        "/archive/newsletter-2022-01/fr",
        "/archive/Newsletter-2022-01/es",
        "/archive/..%2f..%2fetc/es",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "Mensaje no encontrado" in response.text
        assert "Message not found" in response.text


def test_archive_build_writes_the_same_pages(
    cli: Cli, client: httpx.Client, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    result = cli("archive", "build", str(site))
    assert result.exit_code == 0, result.output
    files = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    expected = {f"{slug}/{lang}.html" for slug in SENT for lang in ("es", "en")}
    assert files == {"index.html", *expected}
    index = (site / "index.html").read_text(encoding="utf-8")
    for name in expected:
        assert f'href="{name}"' in index  # links that work from the folder itself
        page = (site / name).read_text(encoding="utf-8")
        assert page == client.get("/archive/" + name.removesuffix(".html")).text
    assert "Wrote 5 page(s)" in result.output


def test_archive_build_with_nothing_sent(cli: Cli, db: Database, tmp_path: Path) -> None:
    result = cli("archive", "build", str(tmp_path / "empty"))
    assert result.exit_code == 0, result.output
    index = (tmp_path / "empty" / "index.html").read_text(encoding="utf-8")
    assert "No message has been sent yet" in index
