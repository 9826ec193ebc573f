"""The subscribe form and its confirmation pages: ``/subscribe`` and
``/subscribe/confirm/TOKEN`` (double opt-in; see ``audience.subscribe``).

- **Nothing is stored before the confirmation**: the form's answers travel sealed in the
  emailed link. A GET never changes anything (link scanners fetch every URL): the link
  opens a page with a button, and only its POST confirms.
- **No enumeration**: a sent form gets the same page whether the address is known,
  suppressed, erased or new, and a filled honeypot field gets it too (nothing is sent).
- **CSRF on every form**: each page with a form sets a random nonce in a cookie
  (``HttpOnly``, ``SameSite=Strict``, limited to ``/subscribe``) and carries its HMAC in a
  hidden field; a POST without both changes nothing and sends nothing (403).
- **Rate limits**, in memory per process: ``ADDRESS_LIMIT`` confirmation messages per
  address and ``CLIENT_LIMIT`` forms per client in ``WINDOW`` seconds (then 429).
- **Bounded fields**: address, name and organisation have limits of their own (one clear
  error); any other field over ``OTHER_FIELD_LIMIT`` is refused too, and the whole body is
  bounded by the app's guard.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from clara_mailer.audience.subscribe import FIELD_LIMITS, FormError, SubscribeRequest
from clara_mailer.core.errors import MailerError, TokenError
from clara_mailer.core.resources import WEB_TEMPLATES
from clara_mailer.core.vocabulary import LANGUAGES, Outcome
from clara_mailer.mailer import Mailer
from clara_mailer.web.admin import RateLimit

COOKIE = "clara_subscribe"
#: Confirmation messages one address may be sent, and forms one client may send, per window.
ADDRESS_LIMIT = 3
CLIENT_LIMIT = 20
WINDOW = 3600
OTHER_FIELD_LIMIT = 200
HONEYPOT = "website"

log = logging.getLogger(__name__)


class SubscribePages:
    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer
        secret = mailer.db.secret_key(mailer.settings)
        self._key = hmac.new(secret.encode("utf-8"), b"clara-mail subscribe csrf", hashlib.sha256)
        base = urlsplit(mailer.settings.base_url)
        self.base_path = base.path.rstrip("/")
        self.secure = base.scheme == "https"
        self.by_address = RateLimit(ADDRESS_LIMIT, WINDOW)
        self.by_client = RateLimit(CLIENT_LIMIT, WINDOW)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(WEB_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # -- helpers --

    def root(self, request: Request) -> str:
        root_path = str(request.scope.get("root_path") or "").rstrip("/")
        return (root_path or self.base_path) + "/subscribe"

    def csrf_for(self, nonce: str) -> str:
        mac = self._key.copy()
        mac.update(nonce.encode("utf-8"))
        return mac.hexdigest()

    def csrf_ok(self, request: Request, fields: dict[str, str]) -> bool:
        nonce = request.cookies.get(COOKIE, "")
        given = fields.get("csrf", "")
        return bool(nonce and given) and hmac.compare_digest(given, self.csrf_for(nonce))

    def page(
        self,
        request: Request,
        name: str,
        language: str,
        status: int = 200,
        *,
        form: bool = False,
        **values: Any,
    ) -> HTMLResponse:
        """Render ``subscribe/NAME``; ``form``: with a fresh CSRF nonce (cookie + field)."""
        nonce = secrets.token_urlsafe(18) if form else ""
        html = self.templates.get_template(f"subscribe/{name}").render(
            language=language,
            es=language == "es",
            root=self.root(request),
            csrf=self.csrf_for(nonce) if form else "",
            **values,
        )
        response = HTMLResponse(html, status_code=status)
        if form:
            response.set_cookie(
                COOKIE,
                nonce,
                max_age=2 * 3600 + self.mailer.settings.confirm_hours * 3600,
                path=self.root(request),
                secure=self.secure,
                httponly=True,
                samesite="strict",
            )
        return response

    @staticmethod
    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    # -- the form --

    async def form(self, request: Request) -> Response:
        language = _language(request.query_params.get("lang"))
        if request.method in ("GET", "HEAD"):
            return await self._form_page(request, language)
        fields, segments = await _read(request)
        language = _language(fields.get("lang"))
        if not self.csrf_ok(request, fields):
            return self.page(request, "message.html", language, 403, kind="stale")
        offer = await run_in_threadpool(self.mailer.subscribe_offer, language)
        if not offer["segments"]:
            return self.page(request, "message.html", language, 404, kind="closed")
        if fields.get(HONEYPOT):
            return self.page(request, "sent.html", language)  # a bot: the same page, no mail
        too_long = _too_long(fields, language)
        if too_long:
            return self._form_again(request, language, offer, fields, segments, too_long)
        address = fields.get("email", "").strip().casefold()
        client = [f"client:{self.client(request)}"]
        if self.by_client.blocked(client):
            return self.page(request, "message.html", language, 429, kind="limit")
        self.by_client.fail(client)  # every form a client sends counts, refused ones too
        if self.by_address.blocked([f"address:{address}"]):
            return self.page(request, "message.html", language, 429, kind="limit")
        try:
            result = await run_in_threadpool(self.mailer.subscribe_request, fields, segments)
        except FormError as exc:
            return self._form_again(request, language, offer, fields, segments, str(exc))
        except MailerError as exc:
            log.error("subscribe: the confirmation message could not be sent: %s", exc)
            return self.page(request, "message.html", language, 503, kind="unavailable")
        self.by_address.fail([f"address:{address}"])
        if result.outcome != Outcome.SENT:
            log.error(
                "subscribe: the confirmation message was not accepted: %s %s",
                result.code,
                result.reply,
            )
            if result.outcome == Outcome.DEFERRED:
                return self.page(request, "message.html", language, 503, kind="unavailable")
        return self.page(request, "sent.html", language)

    async def _form_page(self, request: Request, language: str) -> Response:
        offer = await run_in_threadpool(self.mailer.subscribe_offer, language)
        if not offer["segments"]:
            return self.page(request, "message.html", language, 404, kind="closed")
        return self.page(
            request,
            "form.html",
            language,
            form=True,
            offer=offer,
            values=dict.fromkeys((*FIELD_LIMITS, "language"), ""),
            chosen=[],
            error=None,
        )

    def _form_again(
        self,
        request: Request,
        language: str,
        offer: dict[str, Any],
        fields: dict[str, str],
        segments: list[str],
        error: str,
    ) -> Response:
        values = {k: fields.get(k, "")[: FIELD_LIMITS.get(k, 0)] for k in FIELD_LIMITS}
        values["language"] = fields.get("language", "")
        return self.page(
            request,
            "form.html",
            language,
            400,
            form=True,
            offer=offer,
            values=values,
            chosen=segments,
            error=error,
        )

    # -- the confirmation link --

    async def confirm(self, request: Request) -> Response:
        token = request.path_params["token"]
        try:
            wanted: SubscribeRequest = await run_in_threadpool(self.mailer.subscribe_open, token)
        except TokenError:
            return self.page(request, "invalid.html", "es", 400)
        language = _language(wanted.language)
        if request.method in ("GET", "HEAD"):
            offer = await run_in_threadpool(self.mailer.subscribe_offer, language)
            names = dict(offer["segments"])
            return self.page(
                request,
                "confirm.html",
                language,
                form=True,
                address=wanted.email,
                segments=[names.get(s, s) for s in wanted.segments],
                action=request.url.path,
            )
        fields, _ = await _read(request)
        if not self.csrf_ok(request, fields):
            return self.page(request, "message.html", language, 403, kind="stale")
        try:
            await run_in_threadpool(self.mailer.subscribe_confirm, token)
        except TokenError:
            return self.page(request, "invalid.html", "es", 400)
        return self.page(request, "confirmed.html", language, address=wanted.email)

    def routes(self) -> list[BaseRoute]:
        methods = ["GET", "HEAD", "POST"]
        return [
            Route("/subscribe", self.form, methods=methods),
            Route("/subscribe/confirm/{token:str}", self.confirm, methods=methods),
        ]


def subscribe_routes(mailer: Mailer) -> list[BaseRoute]:
    """The subscribe form's routes, for ``create_app``."""
    return SubscribePages(mailer).routes()


def _language(value: str | None) -> str:
    return value if value in LANGUAGES else "es"


def _too_long(fields: dict[str, str], language: str) -> str | None:
    for key, value in fields.items():
        if key not in FIELD_LIMITS and len(value) > OTHER_FIELD_LIMIT:
            return (
                "Un campo del formulario es demasiado largo."
                if language == "es"
                else "A field of the form is too long."
            )
    return None


async def _read(request: Request) -> tuple[dict[str, str], list[str]]:
    """The form's text fields (the last of each name) and its ``segment`` values."""
    try:
        form = await request.form()
    except (AssertionError, ValueError):
        return {}, []
    try:
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        segments = [v for v in form.getlist("segment") if isinstance(v, str)]
        return fields, segments[:50]
    finally:
        await form.close()
