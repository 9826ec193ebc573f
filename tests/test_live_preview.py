"""The live preview in a real headless Chromium: it follows the author's saves by itself,
and shows ``check``'s problems in place of the message."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from clara_mailer.cli.project import init_project, new_campaign
from clara_mailer.core.settings import load_settings
from clara_mailer.mailer import Mailer
from clara_mailer.web.preview import create_preview_app
from tests.browser import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.conftest import TEST_SECRET
from tests.web_server import serve_in_thread

pytestmark = [pytest.mark.browser, needs_chromium]

SLUG = "spring-2022"


@pytest.fixture
def body(tmp_path: Path) -> Path:
    """A fresh project with a new newsletter; its Spanish Markdown body."""
    project = tmp_path / "project"
    init_project(project)
    settings = load_settings(project, {"CLARA_SECRET_KEY": TEST_SECRET})
    new_campaign(settings, SLUG, "newsletter", None)
    return Path(settings.templates_dir) / SLUG / "body.es.md"


@pytest.fixture
def preview_url(body: Path) -> Iterator[str]:
    settings = load_settings(body.parent.parent.parent, {"CLARA_SECRET_KEY": TEST_SECRET})
    with Mailer(settings) as mailer, serve_in_thread(create_preview_app(mailer, SLUG)) as url:
        yield url


@pytest.fixture
def page(preview_url: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{preview_url}/?language=es&segment=local-police")
            yield page
        finally:
            browser.close()


def test_the_preview_follows_an_edit_of_the_markdown_without_a_reload(
    page: object, body: Path
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    message = page.frame_locator("#message").locator("body")
    expect(message).to_contain_text("Escriba aquí el primer párrafo")
    expect(page.locator("#subject")).to_have_text("Boletín: escriba aquí el asunto")
    expect(page.locator("#text")).to_contain_text("Escriba aquí el primer párrafo")
    expect(page.locator("#headers")).to_contain_text("List-Unsubscribe:")
    assert page.locator("select[name=segment]").input_value() == "local-police"
    # Phone width, and back.
    page.get_by_role("button", name="Phone").click()
    assert page.locator("#frame-box").evaluate("b => b.getBoundingClientRect().width") == 375
    page.get_by_role("button", name="Desktop").click()

    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    text = body.read_text(encoding="utf-8")
    body.write_text(
        text.replace("Escriba aquí el primer párrafo", "La primavera trae noticias nuevas").replace(
            "Boletín: escriba aquí el asunto", "Boletín de primavera"
        ),
        encoding="utf-8",
    )
    expect(message).to_contain_text("La primavera trae noticias nuevas", timeout=15_000)
    expect(page.locator("#subject")).to_have_text("Boletín de primavera")
    expect(page.locator("#text")).to_contain_text("La primavera trae noticias nuevas")
    assert navigations, "the page reloaded itself"
    # The choices survive the reload.
    assert page.locator("select[name=segment]").input_value() == "local-police"

    page.locator("select[name=language]").select_option("en")
    expect(message).to_contain_text("Write the first paragraph here")


def test_the_preview_shows_checks_problems_instead_of_the_message(page: object, body: Path) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    expect(page.frame_locator("#message").locator("body")).to_contain_text("Escriba aquí")
    text = body.read_text(encoding="utf-8")
    body.write_text(text + "\n![](https://proyectoclara.es/foto.jpg)\n", encoding="utf-8")
    line = text.count("\n") + 2
    problems = page.locator("#problems")
    expect(problems).to_be_visible(timeout=15_000)
    expect(problems).to_contain_text(f"{body}:{line}: image https://proyectoclara.es/foto.jpg")
    expect(problems).to_contain_text("has no alt text")
    assert page.locator("#message").count() == 0
    # Fixed: the message is back by itself.
    body.write_text(text + "\n![Una foto](https://proyectoclara.es/foto.jpg)\n", "utf-8")
    expect(page.frame_locator("#message").locator("img[alt='Una foto']")).to_have_count(
        1, timeout=15_000
    )
    assert re.search(r"check found \d", page.content()) is None
