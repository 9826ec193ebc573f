"""The public archive: ``/archive`` lists the campaigns sent, ``/archive/SLUG/LANG`` shows
each message as a web page without any personal data (``Mailer.archive_page``); the
"view in browser" link of every message leads here. Anything else under ``/archive`` is
the same plain 404 page. ``clara-mail archive build DIR`` writes the same pages as files.

Pages are kept for ``CACHE_SECONDS``: a render costs Jinja and CSS inlining, and these
pages are public.
"""

from __future__ import annotations

import re
import time

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from clara_mailer.core.errors import NotFound
from clara_mailer.core.resources import WEB_TEMPLATES
from clara_mailer.core.vocabulary import LANGUAGES
from clara_mailer.mailer import Mailer

CACHE_SECONDS = 60.0
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")


class ArchivePages:
    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(WEB_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        # Only pages found are kept: the keys are the campaigns and languages that exist.
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}

    def not_found(self, request: Request) -> HTMLResponse:
        index = request.scope.get("root_path", "") + "/archive"
        page = self.templates.get_template("archive_not_found.html").render(index=index)
        return HTMLResponse(page, status_code=404)

    async def _cached(self, key: tuple[str, str], make: str) -> str:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        if make == "index":
            page = await run_in_threadpool(self.mailer.archive_index)
        else:
            page = await run_in_threadpool(self.mailer.archive_page, *key)
        self._cache[key] = (now, page)
        return page

    async def index(self, request: Request) -> Response:
        return HTMLResponse(await self._cached(("", ""), "index"))

    async def elsewhere(self, request: Request) -> Response:
        return self.not_found(request)

    async def page(self, request: Request) -> Response:
        slug, language = request.path_params["slug"], request.path_params["language"]
        if not _SLUG.match(slug) or language not in LANGUAGES:
            return self.not_found(request)
        try:
            return HTMLResponse(await self._cached((slug, language), "page"))
        except NotFound:
            return self.not_found(request)


def archive_routes(mailer: Mailer) -> list[Route]:
    """The archive's routes, for ``create_app``."""
    pages = ArchivePages(mailer)
    return [
        Route("/archive", pages.index, methods=["GET"]),
        Route("/archive/{slug:str}/{language:str}", pages.page, methods=["GET"]),
        Route("/archive/{rest:path}", pages.elsewhere, methods=["GET"]),
    ]
