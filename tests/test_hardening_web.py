"""Issue 14 items 17, 18 and 19: the web pages' redirect, access log and sample links."""

from __future__ import annotations

import io
import logging
import logging.config
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import Result

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.web.app import create_app, redact_tokens, uvicorn_log_config
from tests.optout_seed import Seeded
from tests.test_web import snapshot

# --- 17: the trailing-slash redirect ------------------------------------------------


def test_trailing_slash_redirect_does_not_reflect_the_host_header(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded
) -> None:
    token = signer.sign("u", seeded.newsletter_id, seeded.ana_id)
    for path in (f"/u/{token}/", f"/r/{token}/?answer=yes", "/health/"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 307, path
        location = response.headers["location"]
        assert "evil.example" not in location
        assert location == path.replace("/?", "?").rstrip("/")
        assert location.startswith("/") and not location.startswith("//")


def test_trailing_slash_redirect_is_followed_to_the_page(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded
) -> None:
    token = signer.sign("u", seeded.newsletter_id, seeded.ana_id)
    response = client.get(f"/u/{token}/", follow_redirects=True)
    assert response.status_code == 200
    assert "***@policia-getafe.example" in response.text


def test_no_redirect_to_another_site(client: httpx.Client) -> None:
    response = client.get("//evil.example/", headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers


# --- 18: the access log -------------------------------------------------------------


def test_redact_tokens_keeps_a_four_character_prefix() -> None:
    assert redact_tokens("GET /u/abcdefghijklmnop?x=1 HTTP/1.1") == "GET /u/abcd…?x=1 HTTP/1.1"
    assert redact_tokens("POST /r/qrstuvwxyz234567/ HTTP/1.1") == "POST /r/qrst…/ HTTP/1.1"
    assert redact_tokens("GET /health HTTP/1.1") == "GET /health HTTP/1.1"


@contextmanager
def _served_with_access_log(app: Any, stream: io.StringIO) -> Iterator[str]:
    config_dict = uvicorn_log_config()
    for handler in config_dict["handlers"].values():
        handler.pop("stream", None)
        handler["stream"] = stream
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=config_dict, access_log=True, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.filters.clear()


def test_access_log_prints_only_a_token_prefix(
    settings: Settings, seeded: Seeded, signer: TokenSigner
) -> None:
    token = signer.sign("u", seeded.newsletter_id, seeded.ana_id)
    rtoken = signer.sign("r", seeded.invitation_id, seeded.ana_id)
    stream = io.StringIO()
    with (
        _served_with_access_log(create_app(Mailer(settings)), stream) as base_url,
        httpx.Client(base_url=base_url, timeout=10) as http,
    ):
        assert http.get(f"/u/{token}").status_code == 200
        assert http.get(f"/r/{rtoken}?answer=yes").status_code == 200
        assert http.get(f"/u/{token}/").status_code == 307
        deadline = time.monotonic() + 5
        while stream.getvalue().count("/u/") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    log = stream.getvalue()
    assert f"/u/{token[:4]}…" in log
    assert f"/r/{rtoken[:4]}…?answer=yes" in log
    assert token not in log and rtoken not in log
    assert token[:8] not in log


def test_serve_command_uses_the_redacting_log_config(
    cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    result = cli("serve", "--host", "127.0.0.1", "--port", "8025")
    assert result.exit_code == 0, result.output
    config = seen["log_config"]
    assert "redact_tokens" in config["loggers"]["uvicorn.access"]["filters"]


# --- 19: links of a preview or a test send --------------------------------------------


def _links(body: str) -> list[str]:
    return sorted(set(re.findall(r"https?://[^\s\"'<>]*/[ur]/[a-z2-7]+(?:\?answer=\w+)?", body)))


@pytest.mark.parametrize("language", ["es", "en"])
def test_preview_links_lead_to_a_sample_page_that_changes_nothing(
    cli: Callable[..., Result],
    client: httpx.Client,
    db: Database,
    language: str,
) -> None:
    result = cli("preview", "conference-2022-02-04", "--language", language, "--format", "text")
    assert result.exit_code == 0, result.output
    urls = _links(result.output)
    assert any("/u/" in u for u in urls) and any("/r/" in u for u in urls), urls
    before = snapshot(db)
    for url in urls:
        path = "/" + url.split("/", 3)[3]
        page = client.get(path)
        assert page.status_code == 200, (path, page.text)
        assert "Sample message" in page.text and "Mensaje de muestra" in page.text
        assert "Invalid link" not in page.text
        posted = client.post(path.split("?")[0], data={"action": "unsubscribe", "answer": "yes"})
        assert posted.status_code == 200 and "Sample message" in posted.text
        one_click = client.post(path.split("?")[0], data={"List-Unsubscribe": "One-Click"})
        assert one_click.status_code == 200
    assert snapshot(db) == before


@pytest.mark.parametrize("purpose", ["u", "r"])
def test_campaign_zero_tokens_lead_to_a_sample_page_that_changes_nothing(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded, db: Database, purpose: str
) -> None:
    # What preview signs before a send created the campaign row: campaign 0, recipient 0
    # (the sample person) or a real recipient (--recipient).
    before = snapshot(db)
    for recipient_id in (0, seeded.ana_id):
        path = f"/{purpose}/{signer.sign(purpose, 0, recipient_id)}"
        page = client.get(path + ("?answer=yes" if purpose == "r" else ""))
        assert page.status_code == 200
        assert "Sample message" in page.text and "Mensaje de muestra" in page.text
        for form in (
            {"action": "unsubscribe"},
            {"List-Unsubscribe": "One-Click"},
            {"answer": "no"},
        ):
            posted = client.post(path, data=form)
            assert posted.status_code == 200 and "Sample message" in posted.text
    assert snapshot(db) == before


def test_sample_recipient_token_of_a_real_campaign_is_a_sample(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded, db: Database
) -> None:
    before = snapshot(db)
    token = signer.sign("u", seeded.newsletter_id, 0)  # a test send of a planned campaign
    assert "Sample message" in client.post(f"/u/{token}", data={"action": "unsubscribe"}).text
    assert snapshot(db) == before


def test_forged_sample_token_is_still_invalid(client: httpx.Client) -> None:
    forged = TokenSigner("another key, long enough").sign("u", 0, 0)
    page = client.get(f"/u/{forged}")
    assert page.status_code == 400 and "Invalid link" in page.text
