"""Subscribe with double opt-in (issue 16): the form, the sealed confirmation link, the
consent record, and the abuse limits (CSRF, honeypot, rate limits, bounded fields)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from sqlalchemy import func, select

from clara_mailer.audience.subscribe import OUTBOX_FOLDER, SubscribeRequest, text_hash
from clara_mailer.core.errors import ConfigError, InputError
from clara_mailer.core.settings import Settings, load_settings
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.store.models import Consent, ConsentText, Recipient, Suppression
from clara_mailer.web import subscribe as subscribe_web
from clara_mailer.web.app import create_app
from tests.web_server import serve_in_thread

Cli = Callable[..., Result]
ADDRESS = "Lucia.Gomez@ayto-fuenlabrada.example"
LINK = re.compile(r"/subscribe/confirm/([A-Za-z0-9_-]+)")


@pytest.fixture
def sub_settings(settings: Settings) -> Settings:
    # Plain http: the CSRF cookie is not Secure, so the test client keeps it.
    return dataclasses.replace(
        settings, base_url="http://clara.test", subscribe_segments="associations,city-networks"
    )


@pytest.fixture
def mailer(sub_settings: Settings, db: Database) -> Iterator[Mailer]:
    with Mailer(sub_settings, database=db) as m:
        yield m


@pytest.fixture
def base_url(mailer: Mailer) -> Iterator[str]:
    with serve_in_thread(create_app(mailer)) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def outbox(settings: Settings) -> list[EmailMessage]:
    folder = settings.outbox_dir / OUTBOX_FOLDER
    files = sorted(folder.glob("*.eml"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    out = []
    for path in files:
        msg = message_from_bytes(path.read_bytes(), policy=default_policy)
        assert isinstance(msg, EmailMessage)
        out.append(msg)
    return out


def link_of(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    found = LINK.search(body.get_content())
    assert found, body.get_content()
    return found.group(0)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def subscribe(
    http: httpx.Client,
    address: str = ADDRESS,
    *,
    segments: tuple[str, ...] = ("associations",),
    lang: str = "es",
    **extra: str,
) -> httpx.Response:
    form_page = http.get(f"/subscribe?lang={lang}")
    assert form_page.status_code == 200
    digest = re.search(r'name="consent_sha256" value="([0-9a-f]+)"', form_page.text)
    assert digest
    data: dict[str, str | list[str]] = {
        "csrf": csrf_of(form_page.text),
        "lang": lang,
        "consent_sha256": digest.group(1),
        "email": address,
        "name": "Lucía Gómez",
        "organisation": "Ayuntamiento de Fuenlabrada",
        "language": lang,
        "segment": list(segments),
        "consent": "yes",
        "website": "",
    }
    data.update(extra)
    return http.post("/subscribe", data=data)


def confirm(http: httpx.Client, path: str) -> httpx.Response:
    page = http.get(path)
    assert page.status_code == 200, page.text
    return http.post(path, data={"csrf": csrf_of(page.text)})


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


# -- the whole path ------------------------------------------------------------------------


def test_form_shows_offered_segments_consent_text_and_privacy_link(
    http: httpx.Client, mailer: Mailer
) -> None:
    es = http.get("/subscribe")
    assert es.status_code == 200
    assert 'value="associations"' in es.text and 'value="city-networks"' in es.text
    assert 'value="local-police"' not in es.text  # not offered
    assert "Acepto recibir" in es.text
    assert 'href="https://clara.example/privacidad"' in es.text
    assert "clara_subscribe=" in es.headers["set-cookie"]
    assert "httponly" in es.headers["set-cookie"].lower()
    assert "samesite=strict" in es.headers["set-cookie"].lower()
    en = http.get("/subscribe?lang=en")
    assert "I agree to receive" in en.text and "Privacy notice" in en.text
    assert en.headers["content-security-policy"].startswith("default-src 'none'")


def test_subscribe_confirm_adds_the_recipient_with_a_consent_record(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings, db: Database, cli: Cli
) -> None:
    sent = subscribe(http, segments=("associations", "city-networks"))
    assert sent.status_code == 200 and 'id="sent"' in sent.text
    # Nothing about the visitor is stored before the confirmation.
    assert count(db, Recipient) == 0 and count(db, Consent) == 0
    assert count(db, ConsentText) == 1  # the text shown: not about anyone

    (msg,) = outbox(sub_settings)
    assert msg["To"] == ADDRESS
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "Confirme su suscripción" in str(msg["Subject"])
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Observatorio Español del Racismo" in text  # the legal footer
    assert "https://clara.example/privacidad" in text
    path = link_of(msg)
    assert text.count("http://clara.test/subscribe/confirm/") == 1
    token = path.rsplit("/", 1)[1]
    assert len(token) < 600
    # Sealed: neither the address nor the name can be read from the link.
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"fuenlabrada" not in raw.lower() and b"Lucia" not in raw

    page = http.get(path)  # GET shows a button and changes nothing
    assert page.status_code == 200 and 'id="confirm"' in page.text
    assert count(db, Recipient) == 0
    done = http.post(path, data={"csrf": csrf_of(page.text)})
    assert done.status_code == 200 and 'id="confirmed"' in done.text

    record = mailer.recipient(ADDRESS)
    assert record["segments"] == "associations;city-networks"
    assert record["name"] == "Lucía Gómez" and record["consent_source"] == "web form"
    assert record["consent_basis"] == "consent"
    shown = cli("recipients", "show", ADDRESS)
    assert shown.exit_code == 0, shown.output
    digest = text_hash(mailer.subscribe_offer("es")["consent_text"])
    assert "consent record: given" in shown.output and digest in shown.output
    assert "web form" in shown.output

    exported = json.loads(cli("recipients", "export-data", ADDRESS).output)
    (consent,) = exported["consent_records"]
    assert consent["consent_text_sha256"] == digest
    assert consent["consent_text"].startswith("Acepto recibir")
    assert consent["language"] == "es" and consent["source"] == "web form"
    assert consent["given_at"] <= consent["confirmed_at"]

    # The link confirms once: a replay adds no second record.
    again = http.post(path, data={"csrf": csrf_of(http.get(path).text)})
    assert again.status_code == 200
    assert count(db, Consent) == 1


def test_the_same_page_whether_the_address_is_known_or_not(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings
) -> None:
    mailer.add_recipient("conocida@ayto.example", segments=["associations"])
    mailer.add_recipient("baja@ayto.example", segments=["associations"])
    mailer.optout_add("baja@ayto.example", reason="unsubscribe", scope="all")
    pages = [
        subscribe(http, a)
        for a in ("nueva@ayto.example", "conocida@ayto.example", "baja@ayto.example")
    ]
    assert {p.status_code for p in pages} == {200}
    assert len({p.text for p in pages}) == 1
    assert len(outbox(sub_settings)) == 3


def test_a_known_recipient_gains_the_segments_confirmed(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings
) -> None:
    mailer.add_recipient(ADDRESS, segments=["local-police"], name="L. Gómez")
    subscribe(http, segments=("city-networks",))
    confirm(http, link_of(outbox(sub_settings)[0]))
    record = mailer.recipient(ADDRESS)
    assert record["segments"] == "city-networks;local-police"
    assert record["name"] == "L. Gómez"  # what was there stays


def test_an_erased_address_comes_back_only_through_a_new_confirmation(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings, db: Database
) -> None:
    mailer.add_recipient(ADDRESS, segments=["associations"])
    mailer.erase(ADDRESS)
    with pytest.raises(InputError, match="erased"):
        mailer.add_recipient(ADDRESS, segments=["associations"])
    subscribe(http)
    assert count(db, Recipient) == 0  # the form alone brings nobody back
    done = confirm(http, link_of(outbox(sub_settings)[0]))
    assert done.status_code == 200
    assert mailer.recipient(ADDRESS)["segments"] == "associations"
    with db.session() as s:
        rows = list(s.scalars(select(Suppression)))
        assert rows and all(r.lifted_at is not None for r in rows)
        assert all("confirmed subscription" in (r.lifted_note or "") for r in rows)
        (consent,) = s.scalars(select(Consent))
        assert consent.note == "lifted suppression(s): erased"


# -- forged, expired, stale --------------------------------------------------------------


def test_a_forged_or_expired_link_changes_nothing(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings, db: Database
) -> None:
    subscribe(http)
    path = link_of(outbox(sub_settings)[0])
    head, token = path.rsplit("/", 1)
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for bad in (f"{head}/{flipped}", f"{head}/{token[:-1]}", f"{head}/x", f"{head}/{token}%00"):
        assert http.get(bad).status_code in (400, 404)
        assert http.post(bad, data={"csrf": "x"}).status_code in (400, 403, 404)

    digest = text_hash(mailer.subscribe_offer("es")["consent_text"])
    stale = SubscribeRequest(
        ADDRESS, "", "", "es", ("associations",), digest, 1, int(time.time()) - 1
    )
    expired, _ = mailer.subscribe_tokens.seal(stale)
    page = http.get(f"/subscribe/confirm/{expired}")
    assert page.status_code == 400 and 'id="invalid"' in page.text
    assert http.post(f"/subscribe/confirm/{expired}", data={"csrf": "x"}).status_code in (400, 403)
    assert count(db, Recipient) == 0 and count(db, Consent) == 0

    # A token sealed with another key is forged too.
    other = Mailer(
        dataclasses.replace(sub_settings, secret_key="another-secret-key-0123456789"), database=db
    )
    future = dataclasses.replace(stale, expires=int(time.time()) + 3600)
    foreign, _ = other.subscribe_tokens.seal(future)
    assert http.get(f"/subscribe/confirm/{foreign}").status_code == 400
    assert count(db, Recipient) == 0


def test_confirmation_post_without_csrf_changes_nothing(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings, db: Database
) -> None:
    subscribe(http)
    path = link_of(outbox(sub_settings)[0])
    http.cookies.clear()
    refused = http.post(path, data={})
    assert refused.status_code == 403
    assert count(db, Recipient) == 0


# -- abuse limits ------------------------------------------------------------------------------


def test_a_post_without_csrf_sends_nothing(
    http: httpx.Client, base_url: str, sub_settings: Settings
) -> None:
    data = {"email": ADDRESS, "language": "es", "segment": "associations", "consent": "yes"}
    assert http.post("/subscribe", data=data).status_code == 403  # no cookie, no field
    http.get("/subscribe")  # a cookie, but a field that does not match it
    assert http.post("/subscribe", data={**data, "csrf": "0" * 64}).status_code == 403
    with httpx.Client(base_url=base_url) as stranger:  # a field of another browser's cookie
        token = csrf_of(stranger.get("/subscribe").text)
    assert http.post("/subscribe", data={**data, "csrf": token}).status_code == 403
    assert outbox(sub_settings) == []


def test_the_honeypot_gets_the_same_page_and_nothing_is_sent(
    http: httpx.Client, sub_settings: Settings
) -> None:
    trapped = subscribe(http, "bot@spam.example", website="http://spam.example")
    human = subscribe(http, "persona@ayto.example")
    assert trapped.status_code == human.status_code == 200
    assert trapped.text == human.text
    assert [m["To"] for m in outbox(sub_settings)] == ["persona@ayto.example"]


def test_rate_limit_per_address_and_per_client(
    mailer: Mailer, sub_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscribe_web, "ADDRESS_LIMIT", 2)
    monkeypatch.setattr(subscribe_web, "CLIENT_LIMIT", 4)
    with serve_in_thread(create_app(mailer)) as url, httpx.Client(base_url=url) as http:
        assert [subscribe(http).status_code for _ in range(3)] == [200, 200, 429]
        assert 'id="limit"' in subscribe(http).text
        assert len(outbox(sub_settings)) == 2
        # The client has sent 4 forms by now (the refused ones count): another address waits too.
        assert subscribe(http, "otra@ayto.example").status_code == 429
        assert len(outbox(sub_settings)) == 2


def test_oversized_fields_are_refused_with_one_clear_error(
    http: httpx.Client, sub_settings: Settings
) -> None:
    long_name = subscribe(http, name="n" * 201)
    assert long_name.status_code == 400
    assert "El nombre es demasiado larga: 200 caracteres como máximo." in long_name.text or (
        "200 caracteres como máximo" in long_name.text
    )
    long_org = subscribe(http, organisation="o" * 201, lang="en")
    assert long_org.status_code == 400 and "at most 200 characters" in long_org.text
    long_address = subscribe(http, "a" * 250 + "@ayto.example")
    assert long_address.status_code == 400 and "254" in long_address.text
    other = subscribe(http, website="", extra_field="x" * 300)
    assert other.status_code == 400 and "demasiado largo" in other.text
    huge = http.post(
        "/subscribe",
        content=b"x" * 20000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert huge.status_code == 413
    assert outbox(sub_settings) == []


def test_bad_forms_are_refused_and_nothing_is_sent(
    http: httpx.Client, sub_settings: Settings
) -> None:
    assert "dirección de correo válida" in subscribe(http, "no-es-correo").text
    assert "al menos uno" in subscribe(http, segments=()).text
    assert "al menos uno" in subscribe(http, segments=("local-police",)).text  # not offered
    assert "consentimiento" in subscribe(http, consent="").text
    assert "ha cambiado" in subscribe(http, consent_sha256="0" * 64).text
    assert outbox(sub_settings) == []


def test_no_form_without_subscribe_segments(settings: Settings, db: Database) -> None:
    with (
        Mailer(settings, database=db) as mailer,
        serve_in_thread(create_app(mailer)) as url,
        httpx.Client(base_url=url) as http,
    ):
        page = http.get("/subscribe")
        assert page.status_code == 404 and 'id="closed"' in page.text


def test_subscribe_settings_are_checked(tmp_path: Path) -> None:
    loaded = load_settings(
        tmp_path,
        environ={
            "CLARA_SUBSCRIBE_SEGMENTS": " associations , city-networks,associations",
            "CLARA_CONFIRM_HOURS": "24",
            "CLARA_CONSENT_TEXT_EN": "I agree.",
        },
    )
    assert loaded.subscribe_segments == "associations,city-networks"
    assert loaded.confirm_hours == 24 and loaded.consent_text_en == "I agree."
    assert load_settings(tmp_path, environ={}).confirm_hours == 48
    with pytest.raises(ConfigError, match="subscribe_segments must be segment names"):
        load_settings(tmp_path, environ={"CLARA_SUBSCRIBE_SEGMENTS": "Local Police"})
    with pytest.raises(ConfigError, match="confirm_hours must be a number"):
        load_settings(tmp_path, environ={"CLARA_CONFIRM_HOURS": "0"})
    with pytest.raises(ConfigError, match="consent_text_es must be at most 2000"):
        load_settings(tmp_path, environ={"CLARA_CONSENT_TEXT_ES": "x" * 2001})


def test_erasure_deletes_the_consent_record_but_not_the_shared_text(
    http: httpx.Client, mailer: Mailer, sub_settings: Settings, db: Database
) -> None:
    subscribe(http)
    confirm(http, link_of(outbox(sub_settings)[0]))
    assert count(db, Consent) == 1
    mailer.erase(ADDRESS)
    assert count(db, Consent) == 0 and count(db, Recipient) == 0
    assert count(db, ConsentText) == 1  # the text shown to everyone: about no one
