"""The dashboard in a real headless Chromium: log in, watch a running `clara-mail send`
move the figures (the page reloads itself), open the report and check its totals against
`report --format json`, look a recipient up, log out; a stale session and a forged cookie
get the login page.

Screenshots of each page go to tmp_path, or to ``$CLARA_SCREENSHOTS`` when set (the
README's come from ``CLARA_SCREENSHOTS=docs/screenshots pytest tests/test_admin_browser.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.web import admin
from clara_mailer.web.app import create_app
from tests.browser import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.conftest import settings_env
from tests.send_helpers import add_recipients, start_sender
from tests.smtp_server import Faults, RecordingSMTPServer
from tests.web_server import serve_in_thread

pytestmark = [pytest.mark.browser, needs_chromium]

CAMPAIGN = "newsletter-2022-01"
PASSWORD = "correct horse battery"
RECIPIENTS = 150


def _wait(condition: Callable[[], Any], what: str, seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_log_in_watch_a_send_open_the_report_log_out(
    settings: Settings, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("CLARA_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(admin, "REFRESH_SECONDS", 1)  # the page reloads every second
    addresses = add_recipients(db, RECIPIENTS, "local-police")
    refused = {
        a: (550, f"5.1.1 <{a}>: Recipient address rejected: User unknown") for a in addresses[10:13]
    }
    deferred = {addresses[20]: (451, "4.2.0 Mailbox busy, try again later")}
    # Served over plain http on 127.0.0.1: a base_url with no https (no Secure cookie).
    served = dataclasses.replace(settings, base_url="http://127.0.0.1")
    with Mailer(served, database=db) as mailer:
        mailer.add_user("maria", PASSWORD, who="test")
    faults = Faults(replies={**refused, **deferred})
    with (
        RecordingSMTPServer(faults=faults) as smtp,
        serve_in_thread(create_app(Mailer(served))) as base_url,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # Nothing without a session: the login page.
            page.goto(f"{base_url}/admin/campaigns")
            assert page.url == f"{base_url}/admin/login"
            page.screenshot(path=str(shots / "login.png"))
            page.fill("#name", "maria")
            page.fill("#password", "wrong password")
            page.click("button[type=submit]")
            assert "Wrong name or password" in page.inner_text("#login-error")
            errors.clear()  # the console notes that 401: expected
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            assert page.url == f"{base_url}/admin/campaigns"
            assert page.inner_text("#user") == "maria"
            section = f"#campaign-{CAMPAIGN}"
            assert page.get_attribute(section, "data-state") == "planned"

            # A real send, slow enough to watch: 150 messages at 25 a second (6 s).
            sender = start_sender(
                served,
                smtp.url(),
                tmp_path,
                CAMPAIGN,
                "--segment",
                "local-police",
                "--yes",
                "--rate",
                "25",
                env={"CLARA_RETRY_IN_RUN": ""},
            )
            try:
                _wait(lambda: len(smtp.messages) >= 5, "the first messages")
                page.goto(f"{base_url}/admin/campaigns")
                assert page.get_attribute(section, "data-state") == "sending"
                assert page.locator('meta[http-equiv="refresh"]').count() == 1
                sent = f'{section} th[data-status="sent"]'
                seen = [int(page.inner_text(sent))]
                page.screenshot(path=str(shots / "campaigns.png"), full_page=True)
                # No navigation from here: the page reloads itself and the figures move.
                for _ in range(2):
                    seen.append(
                        _wait(
                            lambda: (n := _figure(page, sent)) is not None and n > seen[-1] and n,
                            "the sent figure to grow",
                            30,
                        )
                    )
                assert seen == sorted(seen) and seen[-1] > seen[0]
                _wait(
                    lambda: _attribute(page, section, "data-state") not in (None, "sending"),
                    "the end of the send",
                    120,
                )
                out, err = sender.communicate(timeout=60)
                # 1: done, some recipients refused (the 550s).
                assert sender.returncode == 1, (out + err).decode()
            finally:
                if sender.poll() is None:
                    sender.kill()
                sender.communicate()
            final_state = page.get_attribute(section, "data-state")
            assert final_state == "scheduled"  # one deferred delivery waits for its retry
            assert page.locator('meta[http-equiv="refresh"]').count() == 0

            # The report: the same totals as `report --format json`.
            page.click(f"{section} h2 a")
            assert page.url == f"{base_url}/admin/campaigns/{CAMPAIGN}"
            runner = CliRunner()
            from clara_mailer.cli import main

            result = runner.invoke(
                main, ["report", CAMPAIGN, "--format", "json"], env=settings_env(served)
            )
            assert result.exit_code == 0, result.output
            figures = json.loads(result.output)
            shown = {
                row.locator("td").nth(0).inner_text().strip(): int(
                    row.locator("td").nth(1).inner_text()
                )
                for row in page.locator("#report #totals tr").all()
                if row.locator("td").count()
            }
            assert shown == {k: v for k, v in figures["totals"].items() if v or k == "sent"}
            assert figures["total"] == RECIPIENTS
            assert shown == {"sent": RECIPIENTS - 4, "deferred": 1, "failed": 3}
            missing = page.inner_text("#missing")
            for address in [*refused, *deferred]:
                assert address in missing
            assert "Recipient address rejected" in missing and "Mailbox busy" in missing
            page.screenshot(path=str(shots / "report.png"), full_page=True)

            # The CSV link downloads the CLI's bytes.
            with page.expect_download() as download:
                page.click("text=CSV (every delivery)")
            csv = Path(download.value.path()).read_bytes()
            cli_csv = runner.invoke(
                main, ["report", CAMPAIGN, "--format", "csv"], env=settings_env(served)
            )
            assert csv == cli_csv.stdout_bytes

            # A recipient who did not get it, from the list: segments, consent, outcome.
            page.click(f"#missing a:text('{addresses[10]}')")
            assert "local-police" in page.inner_text("#segments")
            assert "legitimate-interest" in page.inner_text("#consent")
            assert "failed" in page.inner_text("#deliveries")
            page.fill("#note", "asked by phone")
            page.click("#optout-form button[type=submit]")
            assert page.get_by_role("status").inner_text() == "Opt-out recorded."
            assert "dashboard:maria" in page.inner_text("#optouts")
            page.screenshot(path=str(shots / "recipient.png"), full_page=True)

            # Log out: the login page, and the dashboard is closed again.
            page.click("header button[type=submit]")
            assert page.url == f"{base_url}/admin/login"
            page.goto(f"{base_url}/admin/campaigns")
            assert page.url == f"{base_url}/admin/login"
            assert errors == []
        finally:
            browser.close()


def test_a_stale_session_and_a_forged_cookie_get_the_login_page(
    settings: Settings, db: Database
) -> None:
    from playwright.sync_api import sync_playwright

    served = dataclasses.replace(settings, base_url="http://127.0.0.1")
    with Mailer(served, database=db) as mailer:
        mailer.add_user("maria", PASSWORD, who="test")
        signer = admin.Signer(db.secret_key(served))
    stale = admin.encode_session(
        signer, admin.new_session("maria", now=time.time() - admin.SESSION_SECONDS - 60)
    )
    forged = admin.encode_session(admin.Signer("someone else's key!"), admin.new_session("maria"))
    good = admin.encode_session(signer, admin.new_session("maria"))
    with (
        serve_in_thread(create_app(Mailer(served))) as base_url,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for name, value in (("stale", stale), ("forged", forged), ("good", good)):
                context = browser.new_context()
                context.add_cookies(
                    [
                        {
                            "name": admin.COOKIE,
                            "value": value,
                            "domain": "127.0.0.1",
                            "path": "/admin",  # as the dashboard sets it
                        }
                    ]
                )
                page = context.new_page()
                page.goto(f"{base_url}/admin/campaigns")
                if name == "good":
                    assert page.url == f"{base_url}/admin/campaigns", name
                    assert page.inner_text("#user") == "maria"
                else:
                    assert page.url == f"{base_url}/admin/login", name
                    assert page.locator("#password").is_visible(), name
                    # The bad cookie is dropped, not sent again.
                    cookies = {c["name"] for c in context.cookies()}
                    assert admin.COOKIE not in cookies, name
                context.close()
        finally:
            browser.close()


def _figure(page: Any, selector: str) -> int | None:
    """The number in ``selector``, or None while the page is reloading."""
    try:
        text = page.inner_text(selector, timeout=2000)
    except Exception:  # the page is between two loads
        return None
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


def _attribute(page: Any, selector: str, name: str) -> str | None:
    try:
        value = page.get_attribute(selector, name, timeout=2000)
    except Exception:
        return None
    return str(value) if value is not None else None
