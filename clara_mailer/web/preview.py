"""The live preview for authors: ``clara-mail preview SLUG --serve``.

A page on 127.0.0.1 with the rendered message of a sample recipient (the HTML part in an
iframe, at desktop or phone width, the text part and the headers), a selector for the
language and the segment, and ``check``'s problems in place of the message when there
are any. watchfiles watches the campaign's folder and the shared files (layout,
stylesheet, project facts); the page polls ``/version`` and reloads itself when a file
changed, so an author sees each save without touching the browser.
"""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from clara_mailer.core.vocabulary import LANGUAGES, STANDARD_SEGMENTS
from clara_mailer.mailer import Mailer

#: How often the page asks whether a file changed (milliseconds).
POLL_MS = 250
WIDTHS = {"desktop": "100%", "phone": "375px"}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} · clara-mail preview</title>
<style>
body {{ margin: 0; font-family: system-ui, Arial, sans-serif; background: #eef1f5; color: #1f2933; }}
header {{ display: flex; flex-wrap: wrap; gap: 12px; align-items: center; padding: 10px 16px;
  background: #123c69; color: #fff; }}
header h1 {{ font-size: 16px; margin: 0 12px 0 0; }}
header label, header button {{ font-size: 14px; }}
main {{ padding: 16px; }}
#frame-box {{ background: #fff; margin: 0 auto; }}
iframe {{ border: 0; width: 100%; height: 70vh; display: block; }}
pre {{ white-space: pre-wrap; background: #fff; padding: 12px; font-size: 13px; }}
#problems {{ background: #fff4f4; border-left: 5px solid #c81e1e; padding: 12px 16px; }}
#problems li {{ font-family: monospace; margin: 6px 0; }}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
<form method="get" action="/">
<label>Language <select name="language" onchange="this.form.submit()">{languages}</select></label>
<label>Segment <select name="segment" onchange="this.form.submit()">{segments}</select></label>
</form>
<span role="group" aria-label="Width">
<button type="button" data-width="desktop">Desktop</button>
<button type="button" data-width="phone">Phone</button>
</span>
<span id="status">watching for changes</span>
</header>
<main data-version="{version}">
{body}
</main>
<script>
const version = {version};
const box = document.getElementById("frame-box");
function setWidth(name) {{
  sessionStorage.setItem("clara-width", name);
  if (box) box.style.width = {widths}[name];
  document.body.dataset.width = name;
}}
document.querySelectorAll("button[data-width]").forEach(b => b.onclick = () => setWidth(b.dataset.width));
setWidth(sessionStorage.getItem("clara-width") || "desktop");
async function poll() {{
  try {{
    const answer = await fetch("/version", {{cache: "no-store"}});
    const now = (await answer.json()).version;
    if (now !== version) {{ document.getElementById("status").textContent = "reloading"; location.reload(); return; }}
  }} catch (e) {{ document.getElementById("status").textContent = "the preview server stopped"; }}
  setTimeout(poll, {poll_ms});
}}
setTimeout(poll, {poll_ms});
</script>
</body>
</html>
"""


def _options(values: list[tuple[str, str]], chosen: str) -> str:
    return "".join(
        f'<option value="{html.escape(v)}"{" selected" if v == chosen else ""}>'
        f"{html.escape(label)}</option>"
        for v, label in values
    )


class _Watch:
    """A counter that goes up each time a file of the campaign or a shared file changes."""

    def __init__(self, templates: Path, campaign: Path) -> None:
        self.templates, self.campaign = templates.absolute(), campaign.absolute()
        self.version = 0
        self.stop = asyncio.Event()

    def wanted(self, _change: Any, path: str) -> bool:
        changed = Path(path)
        return changed.parent == self.templates or changed.is_relative_to(self.campaign)

    async def run(self) -> None:
        from watchfiles import awatch

        async for _changes in awatch(
            self.templates,
            watch_filter=self.wanted,
            stop_event=self.stop,
            debounce=150,
            step=50,
            rust_timeout=500,
        ):
            self.version += 1


def create_preview_app(mailer: Mailer, slug: str) -> Starlette:
    """The live preview of campaign ``slug`` (checked at each change)."""
    templates = Path(mailer.settings.templates_dir)
    watch = _Watch(templates, templates / slug)
    cache: dict[tuple[int, str, str], dict[str, Any]] = {}

    def segments() -> list[str]:
        from clara_mailer.compose.campaigns import load_campaign
        from clara_mailer.core.errors import MailerError

        extra: tuple[str, ...] = ()
        with suppress(MailerError):
            extra = load_campaign(mailer.settings, slug).default_segments
        return sorted({*STANDARD_SEGMENTS, *extra})

    def state(version: int, language: str, segment: str) -> dict[str, Any]:
        key = (version, language, segment)
        if key not in cache:
            cache.clear()
            cache[key] = mailer.author_preview(slug, language=language, segment=segment)
        return cache[key]

    async def page(request: Request) -> Response:
        language = request.query_params.get("language", LANGUAGES[0])
        language = language if language in LANGUAGES else LANGUAGES[0]
        known = await run_in_threadpool(segments)
        segment = request.query_params.get("segment", "")
        segment = segment if segment in known else ""
        version = watch.version  # before rendering: a change meanwhile reloads again
        shown = await run_in_threadpool(state, version, language, segment)
        if shown["problems"]:
            items = "".join(f"<li>{html.escape(p)}</li>" for p in shown["problems"])
            body = (
                '<section id="problems" role="alert">'
                f"<h2>check found {len(shown['problems'])} problem(s)</h2><ul>{items}</ul>"
                "<p>Fix them and save: this page reloads by itself.</p></section>"
            )
        else:
            body = (
                f'<h2 id="subject">{html.escape(shown["subject"])}</h2>'
                '<div id="frame-box"><iframe id="message" title="The HTML part" '
                f'srcdoc="{html.escape(shown["html"], quote=True)}"></iframe></div>'
                '<h2>Text part</h2><pre id="text">'
                f"{html.escape(shown['text'])}</pre>"
                f'<h2>Headers</h2><pre id="headers">{html.escape(shown["headers"])}</pre>'
            )
        document = _PAGE.format(
            title=html.escape(slug),
            languages=_options([(lang, lang) for lang in LANGUAGES], language),
            segments=_options([("", "(no segment)"), *((s, s) for s in known)], segment),
            version=version,
            body=body,
            widths=json.dumps(WIDTHS),
            poll_ms=POLL_MS,
        )
        return HTMLResponse(document, headers={"Cache-Control": "no-store"})

    async def version(_request: Request) -> Response:
        return JSONResponse({"version": watch.version}, headers={"Cache-Control": "no-store"})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(watch.run())
        try:
            yield
        finally:
            watch.stop.set()
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=5)

    return Starlette(
        routes=[Route("/", page), Route("/version", version)],
        lifespan=lifespan,
    )
