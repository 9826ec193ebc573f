"""The unsubscribe and RSVP pages, through a real HTTP client against the ASGI app,
on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
from sqlalchemy import select

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.optouts.suppressions import active_suppressions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Base, Rsvp, Suppression
from clara_mailer.web.app import MAX_BODY_BYTES, SECURITY_HEADERS, mask_address
from tests.conftest import settings_env
from tests.optout_seed import ANA, JOHN, ZOE, Seeded


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to prove a request changed nothing."""
    with db.engine.connect() as conn:
        return {
            table.name: sorted((tuple(row) for row in conn.execute(table.select())), key=repr)
            for table in Base.metadata.sorted_tables
        }


def suppressions_of(db: Database, signer: TokenSigner, address: str) -> list[Suppression]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Suppression)
                .where(Suppression.address_hash == signer.address_hash(address))
                .order_by(Suppression.id)
            )
        )


def multipart_body(fields: dict[str, str], boundary: str = "clara-boundary-7MA4YWxk") -> bytes:
    """A multipart/form-data body as RFC 8058 senders (Gmail among them) post it."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def test_mask_address_keeps_only_first_letter_and_domain() -> None:
    assert mask_address("ana.perez@policia-getafe.example") == "a***@policia-getafe.example"
    assert mask_address("x@ayuntamiento-málaga.example") == "x***@ayuntamiento-málaga.example"
    assert mask_address("no-at-sign") == "***"


def test_one_click_urlencoded_is_200_not_redirect_and_suppresses(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    token = signer.sign("u", seeded.newsletter_id, seeded.ana_id)
    response = client.post(
        f"/u/{token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code == 200
    assert "location" not in response.headers
    assert "set-cookie" not in response.headers
    [row] = suppressions_of(db, signer, ANA)
    assert (row.reason, row.scope, row.source) == ("one-click", "all", "newsletter-2022-01")
    assert row.campaign_id == seeded.newsletter_id
    assert row.created_at is not None and row.lifted_at is None


def test_one_click_multipart_is_200_not_redirect_and_suppresses(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    token = signer.sign("u", seeded.invitation_id, seeded.john_id)
    boundary = "clara-boundary-7MA4YWxk"
    response = client.post(
        f"/u/{token}",
        content=multipart_body({"List-Unsubscribe": "One-Click"}, boundary),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        follow_redirects=False,
    )
    assert response.status_code == 200
    assert response.history == []
    [row] = suppressions_of(db, signer, JOHN)
    assert (row.reason, row.source, row.campaign_id) == (
        "one-click",
        "final-conference",
        seeded.invitation_id,
    )
    with db.session() as s:
        assert active_suppressions(s, [signer.address_hash(JOHN)], "newsletter") == {
            signer.address_hash(JOHN): "one-click"
        }


def test_one_click_twice_keeps_one_active_row(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    token = signer.sign("u", seeded.newsletter_id, seeded.zoe_id)
    for _ in range(2):
        assert client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert len(suppressions_of(db, signer, ZOE)) == 1


def test_get_and_head_change_nothing(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    before = snapshot(db)
    unsubscribe = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.ana_id)}"
    rsvp = f"/r/{signer.sign('r', seeded.invitation_id, seeded.zoe_id)}"
    for url in (unsubscribe, f"{rsvp}?answer=yes", f"{rsvp}?answer=no", rsvp):
        assert client.get(url).status_code == 200
        assert client.head(url).status_code == 200
    assert snapshot(db) == before


def test_page_flow_get_button_confirmation_undo(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    url = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.ana_id)}"

    page = client.get(url)
    assert page.status_code == 200
    assert '<html lang="es">' in page.text
    assert "A***@policia-getafe.example" in page.text
    assert ANA.lower() not in page.text.lower()
    assert 'value="unsubscribe"' in page.text

    confirmed = client.post(url, data={"action": "unsubscribe"}, follow_redirects=False)
    assert confirmed.status_code == 200
    assert "Se ha dado de baja" in confirmed.text
    assert 'value="undo"' in confirmed.text
    [row] = suppressions_of(db, signer, ANA)
    assert (row.reason, row.source, row.lifted_at) == ("unsubscribe", "newsletter-2022-01", None)

    again = client.get(url)
    assert "ya está dada de baja" in again.text

    undone = client.post(url, data={"action": "undo"})
    assert undone.status_code == 200
    assert "Baja anulada" in undone.text
    [row] = suppressions_of(db, signer, ANA)
    assert row.lifted_at is not None
    assert "undone on the unsubscribe page" in (row.lifted_note or "")
    with db.session() as s:
        assert active_suppressions(s, [signer.address_hash(ANA)]) == {}


def test_undo_lifts_only_what_the_person_chose(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    from clara_mailer.optouts.suppressions import suppress

    with db.session() as s:
        suppress(s, signer, JOHN, reason="hard-bounce", scope="newsletter", source="bounces")
    url = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.john_id)}"
    client.post(url, data={"action": "unsubscribe"})
    client.post(url, data={"action": "undo"})
    with db.session() as s:
        assert active_suppressions(s, [signer.address_hash(JOHN)]) == {
            signer.address_hash(JOHN): "hard-bounce"
        }


def test_page_is_in_the_recipients_language(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded
) -> None:
    page = client.get(f"/u/{signer.sign('u', seeded.newsletter_id, seeded.john_id)}")
    assert '<html lang="en">' in page.text
    assert "Unsubscribe me" in page.text
    assert "j***@oberaxe.example" in page.text


def test_unknown_action_is_refused_and_changes_nothing(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    before = snapshot(db)
    url = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.ana_id)}"
    assert client.post(url, data={"action": "delete-everything"}).status_code == 400
    assert client.post(url, data={"List-Unsubscribe": "Yes"}).status_code == 400
    assert snapshot(db) == before


def _altered(token: str) -> str:
    position = len(token) // 2
    replacement = "a" if token[position] != "a" else "b"
    return token[:position] + replacement + token[position + 1 :]


def test_forged_and_altered_tokens_reveal_and_change_nothing(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    good = signer.sign("u", seeded.newsletter_id, seeded.ana_id)
    other_key = TokenSigner("another-secret-key-of-sufficient-length")
    cases = {
        "altered": (_altered(good), 400),
        "truncated": (good[:-3], 400),
        "other key": (other_key.sign("u", seeded.newsletter_id, seeded.ana_id), 400),
        "rsvp token on /u": (signer.sign("r", seeded.newsletter_id, seeded.ana_id), 400),
        "garbage": ("not-a-token!", 400),
        "unknown recipient": (signer.sign("u", seeded.newsletter_id, 999_999), 404),
        "unknown campaign": (signer.sign("u", 999_999, seeded.ana_id), 404),
    }
    before = snapshot(db)
    bodies = set()
    for name, (token, status) in cases.items():
        for response in (
            client.get(f"/u/{token}"),
            client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}),
            client.post(f"/u/{token}", data={"action": "unsubscribe"}),
        ):
            assert response.status_code == status, name
            text = response.text.lower()
            for secret in ("policia-getafe", "oberaxe", "asociacion", "***", "ana", "@"):
                assert secret not in text, (name, secret)
            bodies.add(response.text)
    assert len(bodies) == 1  # one page for every failure: nothing to tell them apart
    assert snapshot(db) == before


def test_rsvp_get_proposes_post_records_and_last_answer_counts(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    url = f"/r/{signer.sign('r', seeded.invitation_id, seeded.zoe_id)}"

    page = client.get(f"{url}?answer=yes")
    assert page.status_code == 200
    assert 'name="answer" value="yes"' in page.text and 'name="answer" value="no"' in page.text

    def answers() -> list[str]:
        with db.session() as s:
            return list(
                s.scalars(
                    select(Rsvp.answer).where(
                        Rsvp.campaign_id == seeded.invitation_id,
                        Rsvp.recipient_id == seeded.zoe_id,
                    )
                )
            )

    assert answers() == []
    yes = client.post(url, data={"answer": "yes"}, follow_redirects=False)
    assert yes.status_code == 200 and "respuesta registrada" in yes.text
    assert answers() == ["yes"]
    no = client.post(url, data={"answer": "no"})
    assert no.status_code == 200
    assert answers() == ["no"]
    assert "no asistiré" in client.get(url).text


def test_rsvp_refuses_bad_answers_and_newsletter_tokens(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    before = snapshot(db)
    url = f"/r/{signer.sign('r', seeded.invitation_id, seeded.john_id)}"
    assert client.get(f"{url}?answer=maybe").status_code == 400
    assert client.post(url, data={"answer": "maybe"}).status_code == 400
    assert client.post(url, data={}).status_code == 400
    newsletter = f"/r/{signer.sign('r', seeded.newsletter_id, seeded.john_id)}"
    assert client.post(newsletter, data={"answer": "yes"}).status_code == 404
    assert client.post(f"/r/{_altered(url[3:])}", data={"answer": "yes"}).status_code == 400
    assert snapshot(db) == before


def test_oversized_bodies_are_refused(
    client: httpx.Client, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    before = snapshot(db)
    url = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.ana_id)}"
    declared, chunked = oversized_posts(client, url)
    assert declared.status_code == 413
    assert chunked.status_code == 413
    assert snapshot(db) == before


def oversized_posts(client: httpx.Client, url: str) -> tuple[httpx.Response, httpx.Response]:
    """A one-click unsubscribe POST to ``url`` over the body limit, with its length
    declared, then chunked (no Content-Length: refused as it streams in)."""
    padding = "x" * (MAX_BODY_BYTES + 1)
    declared = client.post(url, data={"List-Unsubscribe": "One-Click", "pad": padding})

    def chunks() -> Iterator[bytes]:
        yield b"List-Unsubscribe=One-Click&pad="
        for _ in range(10):
            yield b"x" * 1000

    chunked = client.post(
        url, content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    return declared, chunked


def test_security_headers_on_every_response(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded
) -> None:
    good = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.ana_id)}"
    responses = [
        client.get(good),
        client.post(good, data={"List-Unsubscribe": "One-Click"}),
        client.get("/u/abc"),
        client.get(f"/u/{signer.sign('u', 999_999, 1)}"),
        client.post(good, content=b"x" * 9000),
        client.get("/health"),
        client.get("/nowhere"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 400, 404, 413, 200, 404]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.url, name)
        assert "default-src 'none'" in response.headers["content-security-policy"]


def test_health_reports_the_database(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_clara_mail_serve_answers_health(settings: Settings, db: Database) -> None:
    """The real command in a subprocess, as an operator would start it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **settings_env(settings)}
    command = [sys.executable, "-m", "clara_mailer", "serve", "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert response.status_code == 200
        assert response.json()["database"] == "ok"
        assert "server" not in response.headers
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert "Traceback" not in output
