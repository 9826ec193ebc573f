"""The dashboard at ``/admin``: campaigns, reports and recipient look-up, behind a login.

Read-mostly: the one change it makes to the registry is a manual opt-out. Its rules:

- **Sessions** live in one cookie, ``clara_admin``: the user name, when it was issued,
  when it expires (``SESSION_SECONDS``) and the session's CSRF token, as JSON signed with
  an HMAC-SHA256 whose key is derived from the database's secret key. The cookie is
  ``HttpOnly``, ``SameSite=Strict``, ``Secure`` when ``base_url`` is https, and limited to
  the dashboard's path. A cookie that is forged, expired, issued before the user last
  logged out, or of a user since removed counts as no session at all.
- **Without a session** every ``/admin`` URL answers a redirect to the login page (GET,
  HEAD) or 401 (anything else), before any other work; an unknown ``/admin`` URL too.
- **Every POST** (log in, log out, record an opt-out) carries a CSRF token in a hidden
  field: the session's, or for the login form one tied to a nonce cookie. A POST
  without the right token changes nothing (403).
- **Logging in** is rate-limited per account and per client (``LOGIN_FAILURES`` failures
  in ``LOGIN_WINDOW`` seconds, kept in memory): once over, even the right password is
  refused until the window has passed.
- **Every action** (login, failed login, logout, look-up, download, opt-out) is a row in
  the audit table, which ``clara-mail audit`` lists.
- **Behind a proxy at a sub-path** (``base_url`` such as ``https://example.org/clara``,
  the proxy stripping ``/clara``): links, redirects and the cookie's path are built from
  the path of ``base_url`` (or the ASGI ``root_path``, when the server is given one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from clara_mailer.core.errors import InputError, MailerError, NotFound
from clara_mailer.core.resources import WEB_TEMPLATES
from clara_mailer.core.vocabulary import OptOutScope, Status
from clara_mailer.mailer import Mailer, campaign_state

COOKIE = "clara_admin"
LOGIN_COOKIE = "clara_admin_login"
SESSION_SECONDS = 8 * 3600
LOGIN_FAILURES = 5
LOGIN_WINDOW = 15 * 60
#: How often a page showing a send in progress reloads itself (``<meta refresh>``).
REFRESH_SECONDS = 5
#: Rows of the "who did not get it" list shown on a report page (the CSV has them all).
LISTED_ROWS = 500
#: The states of a delivery whose recipient did not get the message (yet).
NOT_DELIVERED = (Status.FAILED, Status.BOUNCED, Status.UNKNOWN, Status.DEFERRED, Status.SKIPPED)

ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


# -- signing -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """HMAC-SHA256 over JSON values, with a key of its own derived from the secret key."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode("utf-8"), b"clara-mail admin", hashlib.sha256).digest()

    def mac(self, data: bytes) -> str:
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest())

    def dumps(self, value: dict[str, Any]) -> str:
        payload = _b64(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())
        return f"{payload}.{self.mac(payload.encode())}"

    def loads(self, text: str) -> dict[str, Any] | None:
        """The value, or None for anything not signed by this key."""
        payload, dot, mac = text.partition(".")
        if not dot or not hmac.compare_digest(mac.encode(), self.mac(payload.encode()).encode()):
            return None
        try:
            value = json.loads(_unb64(payload))
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Session:
    user: str
    issued: float
    expires: float
    csrf: str


def new_session(user: str, now: float | None = None, seconds: int = SESSION_SECONDS) -> Session:
    issued = time.time() if now is None else now
    return Session(user, issued, issued + seconds, secrets.token_urlsafe(24))


def encode_session(signer: Signer, session: Session) -> str:
    return signer.dumps(
        {"u": session.user, "iat": session.issued, "exp": session.expires, "csrf": session.csrf}
    )


def decode_session(signer: Signer, text: str, now: float | None = None) -> Session | None:
    """The session a cookie holds, or None: forged, malformed or expired."""
    value = signer.loads(text)
    if value is None:
        return None
    try:
        session = Session(str(value["u"]), float(value["iat"]), float(value["exp"]), value["csrf"])
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(session.csrf, str) or session.expires <= (now or time.time()):
        return None
    return session


# -- the login rate limit ----------------------------------------------------------------------


class RateLimit:
    """At most ``limit`` failures per key in ``window`` seconds (in memory, per process)."""

    MAX_KEYS = 10_000

    def __init__(
        self,
        limit: int = LOGIN_FAILURES,
        window: float = LOGIN_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        found = self._failures.get(key)
        if found is None:
            return deque()
        while found and found[0] <= now - self.window:
            found.popleft()
        if not found:
            del self._failures[key]
        return found

    def blocked(self, keys: Iterable[str]) -> bool:
        return any(len(self._recent(key)) >= self.limit for key in keys)

    def fail(self, keys: Iterable[str]) -> None:
        if len(self._failures) > self.MAX_KEYS:  # forget the stale ones first
            for key in list(self._failures):
                self._recent(key)
        now = self.clock()
        for key in keys:
            self._failures.setdefault(key, deque()).append(now)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)


# -- the pages --------------------------------------------------------------------------------

Handler = Callable[[Request, Session], Awaitable[Response]]


class Dashboard:
    """The handlers of ``/admin``; ``routes()`` lists them for the app."""

    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer
        self.signer = Signer(mailer.db.secret_key(mailer.settings))
        base = urlsplit(mailer.settings.base_url)
        self.base_path = base.path.rstrip("/")
        self.secure = base.scheme == "https"
        self.limit = RateLimit()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(WEB_TEMPLATES / "admin"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # -- paths, cookies, pages --

    def root(self, request: Request) -> str:
        """The dashboard's path as the browser sees it: ``/clara/admin`` behind a proxy."""
        root_path = str(request.scope.get("root_path") or "").rstrip("/")
        return (root_path or self.base_path) + "/admin"

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None = None,
        status: int = 200,
        /,
        **values: Any,
    ) -> HTMLResponse:
        values.setdefault("refresh", None)
        page = self.templates.get_template(template).render(
            root=self.root(request),
            user=session.user if session else None,
            csrf=session.csrf if session else "",
            **values,
        )
        return HTMLResponse(page, status_code=status)

    def _set_cookie(
        self, request: Request, response: Response, name: str, value: str, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.root(request),
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )

    def _drop_cookie(self, request: Request, response: Response, name: str) -> None:
        response.delete_cookie(
            name, path=self.root(request), secure=self.secure, httponly=True, samesite="strict"
        )

    def to_login(self, request: Request) -> Response:
        """No session: the login page (GET, HEAD) or 401; a bad cookie is dropped."""
        if request.method in ("GET", "HEAD"):
            response: Response = RedirectResponse(self.root(request) + "/login", status_code=303)
        else:
            response = self._login_again(request, "Log in first.", 401)
        if COOKIE in request.cookies:
            self._drop_cookie(request, response, COOKIE)
        return response

    async def session_of(self, request: Request) -> Session | None:
        session = decode_session(self.signer, request.cookies.get(COOKIE, ""))
        if session is None:
            return None
        exists, valid_after = await run_in_threadpool(self.mailer.user_sessions, session.user)
        if not exists:
            return None
        if valid_after is not None and session.issued <= _epoch(valid_after):
            return None
        return session

    def authed(self, handler: Handler, *, check_csrf: bool = False) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            session = await self.session_of(request)
            if session is None:
                return self.to_login(request)
            if check_csrf or request.method not in ("GET", "HEAD"):
                fields = await _form(request)
                if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
                    return self.render(request, "forbidden.html", session, 403)
                request.state.fields = fields
            return await handler(request, session)

        return endpoint

    def who(self, request: Request, session: Session | None, name: str = "") -> str:
        return session.user if session else f"{name or '?'} from {self.client(request)}"

    @staticmethod
    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    # -- logging in and out --

    def _login_values(self, nonce: str = "", **extra: Any) -> dict[str, Any]:
        token = self.signer.mac(b"login:" + nonce.encode()) if nonce else ""
        return {"login_csrf": token, "error": None, "name": "", **extra}

    async def login(self, request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            if await self.session_of(request) is not None:
                return RedirectResponse(self.root(request) + "/campaigns", status_code=303)
            nonce = secrets.token_urlsafe(18)
            response: Response = self.render(request, "login.html", **self._login_values(nonce))
            self._set_cookie(request, response, LOGIN_COOKIE, nonce, 3600)
            if COOKIE in request.cookies:  # forged, expired, logged out: forget it
                self._drop_cookie(request, response, COOKIE)
            return response

        fields = await _form(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        expected = self.signer.mac(b"login:" + nonce.encode()) if nonce else ""
        if not expected or not hmac.compare_digest(fields.get("csrf", ""), expected):
            return self._login_again(request, "The form was stale: please log in again.", 403)
        name = fields.get("name", "").strip()[:64]
        password = fields.get("password", "")
        keys = [f"user:{name.casefold()}", f"client:{self.client(request)}"]
        if self.limit.blocked(keys):
            await run_in_threadpool(
                self.mailer.audit, self.who(request, None, name), "login-refused", "rate limit"
            )
            return self._login_again(
                request, "Too many failed attempts: wait a quarter of an hour.", 429, name
            )
        ok = bool(name) and await run_in_threadpool(self.mailer.authenticate, name, password)
        if not ok:
            self.limit.fail(keys)
            await run_in_threadpool(
                self.mailer.audit, self.who(request, None, name), "login-failed", ""
            )
            return self._login_again(request, "Wrong name or password.", 401, name)
        self.limit.clear(keys[0])
        session = new_session(name)
        await run_in_threadpool(self.mailer.audit, name, "login", f"from {self.client(request)}")
        response = RedirectResponse(self.root(request) + "/campaigns", status_code=303)
        self._set_cookie(
            request, response, COOKIE, encode_session(self.signer, session), SESSION_SECONDS
        )
        self._drop_cookie(request, response, LOGIN_COOKIE)
        return response

    def _login_again(self, request: Request, error: str, status: int, name: str = "") -> Response:
        nonce = secrets.token_urlsafe(18)
        response = self.render(
            request,
            "login.html",
            None,
            status,
            **self._login_values(nonce, error=error, name=name),
        )
        self._set_cookie(request, response, LOGIN_COOKIE, nonce, 3600)
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        await run_in_threadpool(self.mailer.end_sessions, session.user)
        await run_in_threadpool(self.mailer.audit, session.user, "logout", "")
        response = RedirectResponse(self.root(request) + "/login", status_code=303)
        self._drop_cookie(request, response, COOKIE)
        return response

    # -- campaigns --

    async def index(self, request: Request, session: Session) -> Response:
        return RedirectResponse(self.root(request) + "/campaigns", status_code=303)

    async def campaigns(self, request: Request, session: Session) -> Response:
        rows = await run_in_threadpool(self._campaign_rows)
        sending = any(row["state"] == "sending" for row in rows)
        return self.render(
            request,
            "campaigns.html",
            session,
            campaigns=rows,
            statuses=[s.value for s in Status],
            refresh=REFRESH_SECONDS if sending else None,
        )

    def _campaign_rows(self) -> list[dict[str, Any]]:
        rows = self.mailer.campaign_states()
        for row in rows:
            row["segments"] = {}
            row["total"] = sum(row.get(s.value) or 0 for s in Status)
            done = row["total"] - (row.get("queued") or 0) - (row.get("sending") or 0)
            row["done"] = done
            row["progress"] = round(100 * done / row["total"]) if row["total"] else 0
            if row["state"] != "planned":
                try:
                    report = self.mailer.report(row["slug"])
                except NotFound:
                    continue
                row["segments"] = {
                    seg: {s.value: counts.get(s, 0) for s in Status}
                    for seg, counts in sorted(report.segments.items())
                }
        return rows

    async def campaign(self, request: Request, session: Session) -> Response:
        slug = request.path_params["slug"]
        if not _SLUG.match(slug):
            return self.not_found(request, session)
        try:
            page = await run_in_threadpool(self._campaign_page, slug)
        except NotFound:
            return self.not_found(request, session)
        state = page.pop("state")
        return self.render(
            request,
            "campaign.html",
            session,
            slug=slug,
            state=state,
            refresh=REFRESH_SECONDS if state == "sending" else None,
            **page,
        )

    def _campaign_page(self, slug: str) -> dict[str, Any]:
        report = self.mailer.report(slug)
        out = io.StringIO()
        self.mailer.write_report(out, slug, "html")
        html = out.getvalue()
        style = re.search(r"<style>(.*?)</style>", html, re.S)
        body = re.search(r"<body>(.*)</body>", html, re.S)
        missing: list[dict[str, Any]] = []
        counts = {s: report.totals[s] for s in NOT_DELIVERED}
        for status in NOT_DELIVERED:
            if not counts[status] or len(missing) >= LISTED_ROWS:
                continue
            for row in self.mailer.report_rows(slug, status=status.value):
                missing.append(row)
                if len(missing) >= LISTED_ROWS:
                    break
        row = {"queued": report.totals[Status.QUEUED], "sending": report.totals[Status.SENDING]}
        row.update({s.value: n for s, n in report.totals.items()})
        return {
            "state": campaign_state(row),
            "report": report,
            # render_html's own page, escaped there: its markup goes in as it is.
            "report_style": Markup(style.group(1) if style else ""),
            "report_body": Markup(body.group(1) if body else html),
            "missing": missing,
            "missing_total": sum(counts.values()),
            "missing_counts": {s.value: n for s, n in counts.items() if n},
            "listed_rows": LISTED_ROWS,
        }

    async def download(self, request: Request, session: Session) -> Response:
        slug, fmt = request.path_params["slug"], request.path_params["fmt"]
        if not _SLUG.match(slug) or fmt not in ("csv", "json", "html"):
            return self.not_found(request, session)
        segment = request.query_params.get("segment") or None
        status = request.query_params.get("status") or None
        try:
            text = await run_in_threadpool(self._report_text, slug, fmt, segment, status)
        except NotFound:
            return self.not_found(request, session)
        except InputError as exc:
            return self.render(request, "error.html", session, 400, message=str(exc))
        detail = slug + "".join(
            f" {k}={v}" for k, v in (("segment", segment), ("status", status)) if v
        )
        await run_in_threadpool(self.mailer.audit, session.user, f"download-{fmt}", detail)
        media = {"csv": "text/csv", "json": "application/json", "html": "text/html"}[fmt]
        name = "-".join(p for p in (slug, segment, status) if p)
        disposition = "inline" if fmt == "html" else "attachment"
        headers = {"Content-Disposition": f'{disposition}; filename="{quote(name)}.{fmt}"'}
        return Response(text.encode("utf-8"), media_type=f"{media}; charset=utf-8", headers=headers)

    def _report_text(self, slug: str, fmt: str, segment: str | None, status: str | None) -> str:
        out = io.StringIO(newline="")
        self.mailer.write_report(out, slug, fmt, segment=segment, status=status)
        return out.getvalue()

    # -- recipients --

    async def recipients(self, request: Request, session: Session) -> Response:
        query = request.query_params.get("q", "").strip()[:320]
        address = request.query_params.get("address", "").strip()[:320]
        found: list[dict[str, Any]] | None = None
        record: dict[str, Any] | None = None
        message = None
        if query:
            found = await run_in_threadpool(self.mailer.find_recipients, query)
            await run_in_threadpool(self.mailer.audit, session.user, "lookup", query)
            if len(found) == 1 and not address:
                address = found[0]["email"]
        if address:
            try:
                record = await run_in_threadpool(self.mailer.recipient_record, address)
            except NotFound:
                message = f"Nothing is held about {address}."
            except InputError as exc:
                message = str(exc)
            if not query:
                await run_in_threadpool(self.mailer.audit, session.user, "lookup", address)
        return self.render(
            request,
            "recipients.html",
            session,
            query=query,
            address=address,
            found=found,
            record=record,
            message=message,
            notice=request.query_params.get("done"),
            scopes=[s.value for s in OptOutScope],
        )

    async def optout(self, request: Request, session: Session) -> Response:
        fields: dict[str, str] = request.state.fields
        address = fields.get("address", "").strip()[:320]
        scope = fields.get("scope", OptOutScope.ALL.value)
        note = fields.get("note", "").strip()[:500]
        if scope not in {s.value for s in OptOutScope}:
            return self.render(request, "error.html", session, 400, message="Unknown scope.")
        try:
            new = await run_in_threadpool(
                lambda: self.mailer.dashboard_optout(
                    address, scope=scope, note=note, who=session.user
                )
            )
        except MailerError as exc:
            return self.render(request, "error.html", session, 400, message=str(exc))
        done = "optout-recorded" if new else "optout-existed"
        location = (
            f"{self.root(request)}/recipients?{urlencode({'address': address, 'done': done})}"
        )
        return RedirectResponse(location, status_code=303)

    # -- the audit table --

    async def audit(self, request: Request, session: Session) -> Response:
        rows = await run_in_threadpool(lambda: self.mailer.audit_log(limit=200))
        return self.render(request, "audit.html", session, rows=rows)

    # -- anything else --

    def not_found(self, request: Request, session: Session) -> Response:
        return self.render(request, "error.html", session, 404, message="No such page.")

    async def unknown(self, request: Request, session: Session) -> Response:
        return self.not_found(request, session)

    def routes(self) -> list[BaseRoute]:
        get = ["GET", "HEAD"]
        return [
            Route("/admin", self.authed(self.index), methods=ANY_METHOD),
            Route("/admin/", self.authed(self.index), methods=ANY_METHOD),
            Route("/admin/login", self.login, methods=["GET", "HEAD", "POST"]),
            Route("/admin/logout", self.authed(self.logout), methods=["POST"]),
            Route("/admin/campaigns", self.authed(self.campaigns), methods=get),
            Route("/admin/campaigns/{slug:str}", self.authed(self.campaign), methods=get),
            Route(
                "/admin/campaigns/{slug:str}/report.{fmt:str}",
                self.authed(self.download),
                methods=get,
            ),
            Route("/admin/recipients", self.authed(self.recipients), methods=get),
            Route("/admin/recipients/optout", self.authed(self.optout), methods=["POST"]),
            Route("/admin/audit", self.authed(self.audit), methods=get),
            # Last: every other /admin URL, any method, asks for a session first.
            Route("/admin/{rest:path}", self.authed(self.unknown), methods=ANY_METHOD),
        ]


def admin_routes(mailer: Mailer) -> list[BaseRoute]:
    """The dashboard's routes, for ``create_app``."""
    return Dashboard(mailer).routes()


def _epoch(when: Any) -> float:
    """A naive UTC datetime (as the database keeps them) as a Unix time."""
    import datetime as dt

    return float(when.replace(tzinfo=dt.UTC).timestamp())


async def _form(request: Request) -> dict[str, str]:
    """The text fields of a urlencoded or multipart body (files ignored); {} when none."""
    if request.method in ("GET", "HEAD"):
        return {}
    try:
        form = await request.form()
    except (AssertionError, ValueError):  # not a form at all
        return {}
    try:
        return {key: value for key, value in form.items() if isinstance(value, str)}
    finally:
        await form.close()
