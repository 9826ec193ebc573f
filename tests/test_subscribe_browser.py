"""Subscribing in a real headless Chromium (issue 16): fill the form, read the
confirmation from the outbox, open its link, confirm, and find the recipient with the
consent record in `recipients show`; a second subscription of the same address gets the
same page, and a forged or expired link changes nothing."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest
from click.testing import Result

from clara_mailer.audience.subscribe import SubscribeRequest, text_hash
from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.web.app import create_app
from tests.browser import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.test_subscribe import link_of, outbox
from tests.web_server import serve_in_thread

pytestmark = [pytest.mark.browser, needs_chromium]

ADDRESS = "jordi.puig@mossos-girona.example"


def test_subscribe_confirm_in_a_browser(
    settings: Settings, db: Database, cli: Callable[..., Result]
) -> None:
    from playwright.sync_api import sync_playwright

    served = dataclasses.replace(
        settings, base_url="http://127.0.0.1", subscribe_segments="local-police,city-networks"
    )
    with (
        Mailer(served, database=db) as mailer,
        serve_in_thread(create_app(mailer)) as base_url,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            def fill_and_send() -> str:
                page.goto(f"{base_url}/subscribe?lang=en")
                page.fill("#email", ADDRESS)
                page.fill("#name", "Jordi Puig")
                page.fill("#organisation", "Mossos d'Esquadra, Girona")
                page.select_option("#language", "en")
                page.check("#segment-local-police")
                page.check("#consent")
                page.click("button[type=submit]")
                page.wait_for_selector("#sent")
                return page.content()

            first = fill_and_send()
            assert "Check your inbox" in first
            (message,) = outbox(served)
            path = link_of(message)
            assert mailer.recipients() == []  # nothing stored before the confirmation

            # A forged link and an expired one: the invalid page; nothing changes.
            page.goto(f"{base_url}{path[:-4]}AAAA")
            assert page.locator("#invalid").count() == 1
            digest = text_hash(mailer.subscribe_offer("en")["consent_text"])
            stale = SubscribeRequest(
                ADDRESS, "", "", "en", ("local-police",), digest, 1, int(time.time()) - 60
            )
            expired, _ = mailer.subscribe_tokens.seal(stale)
            page.goto(f"{base_url}/subscribe/confirm/{expired}")
            assert page.locator("#invalid").count() == 1
            assert page.locator("#confirm").count() == 0
            assert mailer.recipients() == []
            errors.clear()  # the console notes the 400s: expected

            page.goto(f"{base_url}{path}")
            assert ADDRESS in page.inner_text("main")
            assert mailer.recipients() == []  # opening the link changes nothing
            page.click("#confirm")
            page.wait_for_selector("#confirmed")

            shown = cli("recipients", "show", ADDRESS)
            assert shown.exit_code == 0, shown.output
            assert "segments: local-police" in shown.output
            assert "name: Jordi Puig" in shown.output
            assert "consent source: web form" in shown.output
            assert "consent record: given" in shown.output
            assert f"(web form, en, segments local-police, text sha256 {digest})" in shown.output

            # A second subscription of the address, known now: the very same page.
            second = fill_and_send()
            assert second == first
            assert len(outbox(served)) == 2
            assert errors == []
        finally:
            browser.close()
