"""The 413 page of the web app: in Spanish and English like every other 4xx page, through
uvicorn and a real HTTP client."""

from __future__ import annotations

import httpx

from clara_mailer.core.tokens import TokenSigner
from clara_mailer.web.app import MAX_BODY_BYTES, SECURITY_HEADERS
from tests.optout_seed import Seeded
from tests.test_web import oversized_posts


def _bilingual(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<html lang="es">' in page
    assert "Solicitud demasiado grande" in page and "no ha cambiado nada" in page
    assert '<h1 lang="en">Request too large</h1>' in page and "nothing has changed" in page
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name


def test_too_large_is_a_bilingual_page_as_the_400_one(
    client: httpx.Client, signer: TokenSigner, seeded: Seeded
) -> None:
    url = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.ana_id)}"
    # The 400 page this one matches: Spanish first, English beside it.
    bad = client.post(url, data={"action": "nonsense"})
    assert bad.status_code == 400 and '<h1 lang="en">Bad request</h1>' in bad.text

    for response in oversized_posts(client, url):  # declared, then chunked
        assert response.status_code == 413
        _bilingual(response)

    # The subscription form and the dashboard's login are behind the same guard.
    for path in ("/subscribe", "/admin/login"):
        response = client.post(
            path,
            content=b"x" * (MAX_BODY_BYTES * 2),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 413, path
        _bilingual(response)


def test_the_routers_404_and_405_are_bilingual_pages(client: httpx.Client) -> None:
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    assert '<html lang="es">' in missing.text
    assert "Página no encontrada" in missing.text and "Page not found" in missing.text
    wrong = client.post("/health")
    assert wrong.status_code == 405
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}  # kept from the router
    assert "Método no permitido" in wrong.text and "Method not allowed" in wrong.text
    for response in (missing, wrong):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
