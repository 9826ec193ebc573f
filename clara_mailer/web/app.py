"""The unsubscribe and RSVP pages: ``create_app(settings)`` -> a Starlette ASGI app.

Rules the pages keep (RFC 2369, RFC 8058 and the bulk-sender rules):

- A GET never changes anything: link scanners fetch every URL in a message. GET shows
  a page with a button; the button, and RFC 8058 one-click, are POSTs.
- The signed token in the URL is the only credential: no cookie, no login, so there is
  no session for a cross-site request to ride on (what CSRF protection guards). That is
  what RFC 8058 asks for: a mail client POSTs ``List-Unsubscribe=One-Click`` without
  any state.
- A bad token, or one naming a campaign or recipient that no longer exists, gets the
  same plain page, which reveals nothing about any address.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cache, partial
from typing import Any

import jinja2
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clara_mailer.core.errors import NotFound, TokenError
from clara_mailer.core.resources import WEB_TEMPLATES
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.optouts import links
from clara_mailer.optouts.links import LinkTarget
from clara_mailer.store.database import Database
from clara_mailer.store.models import Suppression
from clara_mailer.web.admin import admin_routes
from clara_mailer.web.archive import archive_routes
from clara_mailer.web.subscribe import subscribe_routes

MAX_BODY_BYTES = 8 * 1024

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def mask_address(address: str) -> str:
    """``ana.perez@policia-getafe.example`` -> ``a***@policia-getafe.example``."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


class GuardMiddleware:
    """Security headers on every response; request bodies over ``limit`` bytes get 413.

    The body is read here (at most ``limit`` + one chunk) and replayed to the app, so a
    client that lies in Content-Length or sends chunks is refused just the same.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() not in _SECURITY_NAMES
                ]
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(scope, receive, send_with_headers)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _too_large(scope, receive, send_with_headers)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)


_SECURITY_NAMES = {name.lower() for name in SECURITY_HEADERS}


#: The pages the app answers with when no handler of its own does: heading and text,
#: in Spanish and English like every other 4xx page (``templates/web/status.html``).
STATUS_PAGES: dict[int, dict[str, tuple[str, str]]] = {
    404: {
        "es": (
            "Página no encontrada",
            "Esta dirección no corresponde a ninguna página. Si la ha copiado de un mensaje, "
            "compruebe que está completa.",
        ),
        "en": (
            "Page not found",
            "This address is not a page here. If you copied it from a message, check that "
            "it is complete.",
        ),
    },
    405: {
        "es": (
            "Método no permitido",
            "Esta página no admite esa clase de solicitud: no ha cambiado nada.",
        ),
        "en": (
            "Method not allowed",
            "This page does not take that kind of request: nothing has changed.",
        ),
    },
    413: {
        "es": (
            "Solicitud demasiado grande",
            "El formulario enviado es demasiado grande y no se ha procesado: no ha cambiado "
            "nada. Vuelva a la página anterior e inténtelo de nuevo.",
        ),
        "en": (
            "Request too large",
            "The form sent is too large and was not processed: nothing has changed. Go back "
            "to the previous page and try again.",
        ),
    },
}


@cache
def _status_page(status: int) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB_TEMPLATES), autoescape=True)
    return env.get_template("status.html").render(page=STATUS_PAGES[status])


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    # Nothing was read, nothing changed.
    response = HTMLResponse(_status_page(413), status_code=413)
    await response(scope, receive, send)


async def _router_page(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405 (the ``Allow`` header kept)."""
    status = int(getattr(exc, "status_code", 404))
    page = _status_page(status if status in STATUS_PAGES else 404)
    return HTMLResponse(page, status_code=status, headers=getattr(exc, "headers", None))


#: The paths a trailing-slash redirect may lead to (never ``//host``: an open redirect).
_REDIRECTABLE = re.compile(r"^/(?:[ur]/[a-z2-7]{1,64}|health)$")


class SlashRedirectMiddleware:
    """``/u/TOKEN/`` -> 307 to the path ``/u/TOKEN``, never to an absolute URL.

    Starlette's own redirect builds ``http://{Host}/...`` from the request's Host
    header, which an attacker chooses; a path-only Location cannot leave the site.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            path: str = scope["path"]
            local = path[len(root) :] if root and path.startswith(root) else path
            if local.endswith("/") and _REDIRECTABLE.match(local[:-1]):
                location = root + local[:-1]
                query = scope.get("query_string", b"").decode("latin-1")
                if query:
                    location += "?" + query
                response = RedirectResponse(location, status_code=307)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- access log ---------------------------------------------------------------------

#: ``/u/TOKEN`` or ``/r/TOKEN``: the token is a credential, so logs keep 4 characters.
_TOKEN_IN_PATH = re.compile(r"(/[urUR]/)([^/?#\s]{0,4})[^/?#\s]*")
TOKEN_PREFIX_CHARS = 4


def redact_tokens(text: str) -> str:
    """``GET /u/abcdefgh...?answer=yes`` -> ``GET /u/abcd…?answer=yes``."""
    return _TOKEN_IN_PATH.sub(lambda m: f"{m[1]}{m[2]}…", text)


class TokenRedactingFilter(logging.Filter):
    """Shortens tokens in uvicorn's access-log records (their args hold the path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_tokens(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging config, with tokens shortened in the access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": TokenRedactingFilter}
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = config["loggers"].setdefault(name, {})
        logger["filters"] = [*logger.get("filters", []), "redact_tokens"]
    return config


#: What the 400 page says of a form that cannot be used, in each language it shows.
BAD_REQUESTS: dict[str, dict[str, str]] = {
    "action": {
        "es": "Este formulario pide una acción desconocida.",
        "en": "This form asks for an unknown action.",
    },
    "answer": {
        "es": "La respuesta debe ser sí o no.",
        "en": "The answer must be yes or no.",
    },
}


class Pages:
    """The handlers: parse the request, call one function of ``links``, render a page."""

    def __init__(self, database: Database, signer: TokenSigner) -> None:
        self.db = database
        self.signer = signer
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(WEB_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )

    def render(self, name: str, target: LinkTarget, request: Request, **extra: Any) -> Response:
        template = self.templates.get_template(f"{target.language}/{name}")
        page = template.render(
            language=target.language,
            masked=mask_address(target.email),
            action=request.url.path,  # forms post back to the same signed URL
            **extra,
        )
        return HTMLResponse(page)

    def invalid(self, status: int = 400) -> HTMLResponse:
        # One page for every failure: it must not tell a forged token from a stale one.
        page = self.templates.get_template("invalid.html").render()
        return HTMLResponse(page, status_code=status)

    def bad_request(self, problem: str) -> HTMLResponse:
        """400 for a form of a valid link that cannot be used, in Spanish and English
        (as the invalid-link page): ``problem`` is a key of ``BAD_REQUESTS``."""
        page = self.templates.get_template("invalid.html").render(problem=BAD_REQUESTS[problem])
        return HTMLResponse(page, status_code=400)

    def sample(self) -> HTMLResponse:
        # Links of a preview or a test send: shown, but nothing is ever recorded.
        return HTMLResponse(self.templates.get_template("sample.html").render())

    async def target(self, request: Request, purpose: str) -> LinkTarget | Response:
        token = request.path_params["token"]
        try:
            data = self.signer.verify(purpose, token)
        except TokenError:
            return self.invalid(400)
        # A preview or a test send signs campaign 0 (no campaign row yet) or recipient 0
        # (a sample person): a genuine link of a sample, not a forged one.
        if data.campaign_id == 0 or data.recipient_id == 0:
            return self.sample()
        try:
            return await run_in_threadpool(links.resolve, self.db, self.signer, purpose, token)
        except TokenError:
            return self.invalid(400)
        except NotFound:
            return self.invalid(404)

    async def unsubscribe_page(self, request: Request) -> Response:
        target = await self.target(request, "u")
        if not isinstance(target, LinkTarget):
            return target
        if request.method != "POST":
            already = await run_in_threadpool(links.is_unsubscribed, self.db, self.signer, target)
            return self.render("unsubscribe.html", target, request, already=already)

        fields = await _form_fields(request)
        one_click = fields.get("List-Unsubscribe") == "One-Click"  # RFC 8058
        if one_click or fields.get("action") == "unsubscribe":
            await run_in_threadpool(
                partial(links.unsubscribe, one_click=one_click), self.db, self.signer, target
            )
            return self.render("unsubscribed.html", target, request)
        if fields.get("action") == "undo":
            await run_in_threadpool(links.undo_unsubscribe, self.db, self.signer, target)
            return self.render("resubscribed.html", target, request)
        return self.bad_request("action")

    async def rsvp_page(self, request: Request) -> Response:
        target = await self.target(request, "r")
        if not isinstance(target, LinkTarget):
            return target
        if request.method != "POST":
            # GET only proposes: a link scanner fetching both the yes and the no link of
            # a message must record neither.
            proposed = request.query_params.get("answer")
            if proposed not in (None, *links.ANSWERS):
                return self.bad_request("answer")
            current = await run_in_threadpool(links.rsvp_answer, self.db, target)
            return self.render("rsvp.html", target, request, proposed=proposed, current=current)

        answer = (await _form_fields(request)).get("answer")
        if answer not in links.ANSWERS:
            return self.bad_request("answer")
        await run_in_threadpool(links.record_rsvp, self.db, target, answer)
        return self.render("rsvp_done.html", target, request, answer=answer)

    # --- monitoring ---

    def database_ok(self) -> bool:
        try:
            with self.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                conn.execute(select(Suppression.id).limit(1))
        except SQLAlchemyError:
            return False
        return True

    async def health(self, request: Request) -> Response:
        if await run_in_threadpool(self.database_ok):
            return JSONResponse({"status": "ok", "database": "ok"})
        return JSONResponse({"status": "error", "database": "unreachable"}, status_code=503)


async def _form_fields(request: Request) -> dict[str, str]:
    """The text fields of an urlencoded or multipart body (files are ignored)."""
    form = await request.form()
    try:
        return {key: value for key, value in form.items() if isinstance(value, str)}
    finally:
        await form.close()


_TOKEN = "{token:str}"
_TOKEN_SHAPE = re.compile(r"^[a-z2-7]{1,64}$")


def create_app(mailer: Mailer) -> Starlette:
    """The ASGI app serving ``mailer``'s pages; closes the mailer on shutdown."""
    database = mailer.db
    pages = Pages(database, mailer.signer)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            mailer.close()

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            # Refuse absurd tokens before any work: the signature check would too.
            if not _TOKEN_SHAPE.match(request.path_params["token"]):
                return pages.invalid(400)
            return await handler(request)

        return endpoint

    routes = [
        Route(f"/u/{_TOKEN}", guarded(pages.unsubscribe_page), methods=["GET", "POST"]),
        Route(f"/r/{_TOKEN}", guarded(pages.rsvp_page), methods=["GET", "POST"]),
        Route("/health", pages.health, methods=["GET"]),
        *archive_routes(mailer),  # the public archive: /archive, /archive/SLUG/LANG
        *subscribe_routes(mailer),  # /subscribe, double opt-in (web/subscribe.py)
        *admin_routes(mailer),  # the dashboard: /admin, behind a login (web/admin.py)
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(GuardMiddleware), Middleware(SlashRedirectMiddleware)],
        exception_handlers={404: _router_page, 405: _router_page},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # it would reflect the Host header
    app.state.database = database
    return app
