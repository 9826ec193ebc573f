"""A real headless Chromium opens the unsubscribe link of a rendered message and clicks."""

from __future__ import annotations

import dataclasses
import re

import pytest
from sqlalchemy import select

from clara_mailer.compose import campaigns, render
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.store.models import Suppression
from clara_mailer.web.app import create_app
from tests.browser import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.optout_seed import ANA, seed
from tests.web_server import serve_in_thread

pytestmark = [
    pytest.mark.browser,
    needs_chromium,
]


def test_unsubscribe_link_from_a_rendered_message_in_chromium(
    settings: Settings, db: Database
) -> None:
    from playwright.sync_api import sync_playwright

    signer = TokenSigner(db.secret_key(settings))
    seeded = seed(db, signer)
    with serve_in_thread(create_app(Mailer(settings))) as base_url:
        # The message links to where the app is actually served.
        served = dataclasses.replace(settings, base_url=base_url)
        definition = campaigns.load_campaign(served, "newsletter-2022-01")
        renderer = render.Renderer(definition, served, signer, seeded.newsletter_id)
        message = renderer.render(
            render.RecipientView(
                seeded.ana_id,
                ANA,
                "Ana Pérez Núñez",
                "Policía Local de Getafe",
                "es",
                "local-police",
            )
        )
        text_part, html_part = render.message_parts(message)
        links = re.findall(r'href="(http://127\.0\.0\.1:\d+/u/[a-z2-7]+)"', html_part)
        assert links, "no unsubscribe link in the rendered HTML"
        link = links[0]
        assert link in text_part
        assert f"<{link}>" in render.parse_message(message)["List-Unsubscribe"]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                blocked: list[str] = []
                page.on("console", lambda m: blocked.append(m.text) if m.type == "error" else None)
                page.goto(link)
                assert page.locator("html").get_attribute("lang") == "es"
                assert "A***@policia-getafe.example" in page.inner_text("main")
                button = page.get_by_role("button", name="Darme de baja")
                # The inline style applies: the CSP allows it and blocks everything else.
                colour = button.evaluate("b => getComputedStyle(b).backgroundColor")
                assert colour == "rgb(31, 78, 150)"

                button.click()
                page.wait_for_load_state()
                assert page.get_by_role("status").inner_text() == "Se ha dado de baja"
                assert page.get_by_role("button", name="Deshacer la baja").is_visible()
                assert blocked == []
            finally:
                browser.close()

    with db.session() as s:
        rows = list(
            s.scalars(
                select(Suppression).where(Suppression.address_hash == signer.address_hash(ANA))
            )
        )
    assert [(r.reason, r.scope, r.source, r.campaign_id, r.lifted_at) for r in rows] == [
        ("unsubscribe", "all", "newsletter-2022-01", seeded.newsletter_id, None)
    ]
