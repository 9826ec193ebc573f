"""The dashboard: accounts and the audit table (CLI), then /admin behind a login."""

from __future__ import annotations

import dataclasses
import io
import re
import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from sqlalchemy import select, update

from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.store.models import AuditEntry, Delivery, Suppression, User
from clara_mailer.web import admin
from clara_mailer.web.app import create_app
from tests.report_helpers import (
    INVITATION,
    NEWSLETTER,
    BuiltLog,
    build_invitation_log,
    build_newsletter_log,
)
from tests.web_server import serve_in_thread

Cli = Callable[..., Result]
PASSWORD = "correct horse battery"


# -- accounts and audit (part 1) -------------------------------------------------------------


def test_users_add_asks_twice_stores_an_argon2_hash_and_audits(
    cli: Cli, db: Database, settings: Settings
) -> None:
    added = cli("users", "add", "maria", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert added.exit_code == 0, added.output
    assert PASSWORD not in added.output  # hidden input: never echoed
    with db.session() as s:
        user = s.scalars(select(User).where(User.name == "maria")).one()
        assert user.password_hash.startswith("$argon2id$")
        assert PASSWORD not in user.password_hash
    with Mailer(settings, database=db) as mailer:
        assert mailer.authenticate("maria", PASSWORD)
        assert not mailer.authenticate("maria", PASSWORD + "x")
        assert not mailer.authenticate("nobody", PASSWORD)

    listed = cli("users", "list", "--format", "json")
    assert listed.exit_code == 0 and '"name": "maria"' in listed.output
    assert "argon2" not in listed.output

    audit = cli("audit", "--format", "csv")
    assert audit.exit_code == 0
    assert "user-added,maria" in audit.output and "cli" in audit.output


def test_users_add_refuses_mismatch_short_password_duplicates_and_bad_names(
    cli: Cli, db: Database
) -> None:
    mismatch = cli("users", "add", "maria", input=f"{PASSWORD}\nother password\n")
    assert mismatch.exit_code != 0
    short = cli("users", "add", "maria", input="short\nshort\n")
    assert short.exit_code == 2 and "too short" in short.output
    assert cli("users", "add", "maria", input=f"{PASSWORD}\n{PASSWORD}\n").exit_code == 0
    again = cli("users", "add", "maria", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert again.exit_code == 2 and "exists already" in again.output
    bad = cli("users", "add", "no spaces please")
    assert bad.exit_code == 2 and "not a valid user name" in bad.output
    with db.session() as s:
        assert list(s.scalars(select(User.name))) == ["maria"]


def test_users_remove_and_audit_lists_newest_first(cli: Cli, db: Database) -> None:
    assert cli("users", "add", "maria", input=f"{PASSWORD}\n{PASSWORD}\n").exit_code == 0
    assert cli("users", "remove", "maria", input="n\n").exit_code == 1  # declined
    removed = cli("users", "remove", "maria", "--yes")
    assert removed.exit_code == 0, removed.output
    missing = cli("users", "remove", "maria", "--yes")
    assert missing.exit_code == 1 and "no user 'maria'" in missing.output
    empty = cli("users", "list")
    assert "No users" in empty.output
    audit = cli("audit", "--format", "json")
    import json

    rows = json.loads(audit.output)
    assert [r["what"] for r in rows] == ["user-removed", "user-added"]
    assert {r["detail"] for r in rows} == {"maria"}
    assert json.loads(cli("audit", "--user", "nobody", "--format", "json").output) == []


# -- /admin behind a login (part 2) ------------------------------------------------------------


#: Every dashboard URL but the login page (which is the one page open without a session).
ADMIN_URLS = [
    "/admin",
    "/admin/",
    "/admin/campaigns",
    "/admin/campaigns/newsletter-2022-01",
    "/admin/campaigns/newsletter-2022-01/report.csv",
    "/admin/campaigns/newsletter-2022-01/report.json",
    "/admin/campaigns/newsletter-2022-01/report.html",
    "/admin/recipients",
    "/admin/recipients?q=policia",
    "/admin/recipients?address=ana%40policia-getafe.example",
    "/admin/audit",
    "/admin/no-such-page",
    "/admin/recipients/optout",
    "/admin/logout",
]


@pytest.fixture
def mailer(settings: Settings, db: Database) -> Iterator[Mailer]:
    with Mailer(settings, database=db) as m:
        m.add_user("maria", PASSWORD, who="test")
        yield m


class Client:
    """An HTTP client with a cookie jar of its own that keeps every cookie by name (the
    server is plain http on 127.0.0.1, where httpx's jar would drop ``Secure`` ones), as
    a browser does at the https address of ``base_url``."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30, follow_redirects=False)
        self.cookies: dict[str, str] = {}

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        headers = {"Cookie": cookie} if cookie else {}
        response = self.http.request(method, url, headers=headers, **kwargs)
        for line in response.headers.get_list("set-cookie"):
            parsed: SimpleCookie = SimpleCookie()
            parsed.load(line)
            for name, morsel in parsed.items():
                if morsel["max-age"] == "0" or not morsel.value.strip('"'):
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture
def client(mailer: Mailer) -> Iterator[Client]:
    with serve_in_thread(create_app(mailer)) as base_url:
        c = Client(base_url)
        try:
            yield c
        finally:
            c.http.close()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', html)
    assert found, html
    return found.group(1)


def log_in(client: Client, name: str = "maria", password: str = PASSWORD) -> httpx.Response:
    page = client.get("/admin/login")
    assert page.status_code == 200
    return client.post(
        "/admin/login",
        data={"name": name, "password": password, "csrf": csrf_of(page.text)},
    )


def audit_whats(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(AuditEntry.what).order_by(AuditEntry.id)))


def test_every_admin_url_needs_a_session(client: Client) -> None:
    for url in ADMIN_URLS:
        got = client.get(url)
        assert got.status_code == 303, url
        assert got.headers["location"] == "/admin/login", url
        assert client.head(url).status_code == 303, url
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            refused = client.request(method, url, data={"csrf": "x"})
            assert refused.status_code == 401, (method, url)
            assert "Log in first" in refused.text
            assert "report" not in refused.text.lower() or "Log in" in refused.text


def test_login_sets_a_strict_httponly_secure_expiring_cookie_and_audits(
    client: Client, db: Database
) -> None:
    done = log_in(client)
    assert done.status_code == 303 and done.headers["location"] == "/admin/campaigns"
    cookie = next(
        h for h in done.headers.get_list("set-cookie") if h.startswith(f"{admin.COOKIE}=")
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/admin" in cookie.lower()
    assert f"max-age={admin.SESSION_SECONDS}" in cookie.lower()
    page = client.get("/admin/campaigns")
    assert page.status_code == 200 and "newsletter-2022-01" in page.text
    assert 'id="user">maria<' in page.text
    assert client.get("/admin").headers["location"] == "/admin/campaigns"
    assert audit_whats(db)[-1] == "login"


def test_plain_http_base_url_gets_no_secure_flag(settings: Settings, db: Database) -> None:
    plain = dataclasses.replace(settings, base_url="http://127.0.0.1:8025")
    with Mailer(plain, database=db) as m:
        m.add_user("maria", PASSWORD, who="test")
        with serve_in_thread(create_app(m)) as base_url:
            c = Client(base_url)
            done = log_in(c)
            c.http.close()
        assert "secure" not in done.headers["set-cookie"].lower()


def test_wrong_password_unknown_user_and_stale_login_form(client: Client, db: Database) -> None:
    wrong = log_in(client, password="not the password")
    assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
    assert log_in(client, name="nobody").status_code == 401
    no_token = client.post("/admin/login", data={"name": "maria", "password": PASSWORD})
    assert no_token.status_code == 403
    assert f"{admin.COOKIE}=" not in no_token.headers.get("set-cookie", "")
    assert client.get("/admin/campaigns").status_code == 303
    assert audit_whats(db)[-2:] == ["login-failed", "login-failed"]


def test_the_login_rate_limit_holds_per_account_and_per_client(
    client: Client, db: Database, mailer: Mailer
) -> None:
    for _ in range(admin.LOGIN_FAILURES):
        assert log_in(client, password="guess").status_code == 401
    # Over the limit: even the right password is refused, and no session is made.
    refused = log_in(client)
    assert refused.status_code == 429 and "Too many failed attempts" in refused.text
    assert client.get("/admin/campaigns").status_code == 303
    assert audit_whats(db)[-1] == "login-refused"
    # Per client too: guessing another account's password from the same client.
    mailer.add_user("pedro", PASSWORD, who="test")
    assert log_in(client, name="pedro").status_code == 429


def test_the_rate_limit_forgets_after_its_window() -> None:
    now = [1000.0]
    limit = admin.RateLimit(limit=2, window=60, clock=lambda: now[0])
    keys = ["user:maria", "client:1.2.3.4"]
    limit.fail(keys)
    limit.fail(keys)
    assert limit.blocked(keys) and limit.blocked(["client:1.2.3.4"])
    assert not limit.blocked(["user:pedro"])
    now[0] += 61
    assert not limit.blocked(keys)


def test_a_forged_cookie_and_an_expired_session_get_the_login_page(
    client: Client, mailer: Mailer
) -> None:
    signer = admin.Signer(mailer.db.secret_key(mailer.settings))
    forger = admin.Signer("another secret key, not the server's")
    cases = {
        "forged": admin.encode_session(forger, admin.new_session("maria")),
        "tampered": admin.encode_session(signer, admin.new_session("maria"))[:-2] + "xx",
        "expired": admin.encode_session(
            signer, admin.new_session("maria", now=time.time() - admin.SESSION_SECONDS - 1)
        ),
        "unknown user": admin.encode_session(signer, admin.new_session("nobody")),
        "garbage": "not-a-cookie",
    }
    for case, value in cases.items():
        client.cookies[admin.COOKIE] = value
        got = client.get("/admin/campaigns")
        assert got.status_code == 303 and got.headers["location"] == "/admin/login", case
        login = client.get("/admin/login")
        assert login.status_code == 200 and 'name="password"' in login.text, case
        client.cookies.clear()
    # The genuine article works: the same code, the server's key, not expired.
    good = admin.encode_session(signer, admin.new_session("maria"))
    client.cookies[admin.COOKIE] = good
    assert client.get("/admin/campaigns").status_code == 200


def test_logout_needs_the_csrf_token_and_voids_the_session(client: Client, db: Database) -> None:
    log_in(client)
    page = client.get("/admin/campaigns")
    stolen = client.cookies.get(admin.COOKIE)
    refused = client.post("/admin/logout", data={})
    assert refused.status_code == 403
    assert client.get("/admin/campaigns").status_code == 200  # still logged in
    out = client.post("/admin/logout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/admin/login"
    assert client.get("/admin/campaigns").status_code == 303
    # The cookie as it was before logging out is void too (a copy someone kept).
    assert stolen
    client.cookies[admin.COOKIE] = stolen
    assert client.get("/admin/campaigns").status_code == 303
    assert audit_whats(db)[-1] == "logout"


def test_a_removed_user_is_logged_out(client: Client, mailer: Mailer) -> None:
    log_in(client)
    assert client.get("/admin/campaigns").status_code == 200
    mailer.remove_user("maria", who="test")
    assert client.get("/admin/campaigns").status_code == 303


def test_behind_a_proxy_at_a_sub_path(settings: Settings, db: Database) -> None:
    at_path = dataclasses.replace(settings, base_url="https://example.org/clara/")
    with Mailer(at_path, database=db) as m:
        m.add_user("maria", PASSWORD, who="test")
        # The proxy strips /clara: the app sees /admin, the browser /clara/admin.
        with serve_in_thread(create_app(m)) as base_url:
            c = Client(base_url)
            assert c.get("/admin/campaigns").headers["location"] == "/clara/admin/login"
            page = c.get("/admin/login")
            assert 'action="/clara/admin/login"' in page.text
            assert "path=/clara/admin" in page.headers["set-cookie"].lower()
            done = c.post(
                "/admin/login",
                data={"name": "maria", "password": PASSWORD, "csrf": csrf_of(page.text)},
            )
            assert done.status_code == 303 and done.headers["location"] == "/clara/admin/campaigns"
            assert "path=/clara/admin" in done.headers["set-cookie"].lower()
            assert c.get("/admin/campaigns").status_code == 200
            c.http.close()


# -- the pages (part 3) ------------------------------------------------------------------------


#: The legal footer a send over SMTP needs (sends refuse without it).
LEGAL = {
    "sender_legal_name": "CLARA consortium, Universidad de Ejemplo",
    "sender_postal_address": "Calle Mayor 1, 28001 Madrid, Spain",
    "controller_contact": "dpo@clara.example",
    "privacy_url": "https://clara.example/privacy",
}


@pytest.fixture
def built(settings: Settings, db: Database, tmp_path: Path) -> BuiltLog:
    legal = dataclasses.replace(settings, **LEGAL)
    log = build_newsletter_log(db, legal, tmp_path)
    build_invitation_log(db, legal)
    return log


@pytest.fixture
def frozen_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report generated at one time: the CLI's and the dashboard's can be compared
    byte for byte (the JSON and the HTML say when they were made)."""
    import datetime as dt

    from clara_mailer.reporting import report

    monkeypatch.setattr(report, "utcnow", lambda: dt.datetime(2026, 3, 1, 12, 0, 0))


def test_campaigns_page_shows_states_and_figures_per_segment(
    built: BuiltLog, client: Client, db: Database
) -> None:
    log_in(client)
    page = client.get("/admin/campaigns")
    assert page.status_code == 200
    html = page.text
    states = dict(re.findall(r'id="campaign-([a-z0-9-]+)" data-state="(\w+)"', html))
    # The newsletter has deferred deliveries left: retries are scheduled.
    assert states[NEWSLETTER] == "scheduled"
    assert states[INVITATION] == "finished"
    assert "planned" in states.values()  # the press release, never sent
    assert 'http-equiv="refresh"' not in html  # nothing running: no reloading
    section = html.split(f'id="campaign-{NEWSLETTER}"')[1].split("</section>")[0]
    for segment, counts in built.expected_segments().items():
        row = section.split(f"<td>{segment}</td>")[1].split("</tr>")[0]
        cells = [int(c) for c in re.findall(r'<td class="n">(\d+)</td>', row)]
        assert cells[0] == counts["sent"]  # statuses in report order: sent first
        assert cells[-1] == sum(counts.values())

    # A send in progress: queued rows make it "sending", and the page reloads itself.
    with db.session() as s:
        s.execute(
            update(Delivery)
            .where(Delivery.status == "deferred")
            .values(status="queued", next_attempt_at=None)
        )
    live = client.get("/admin/campaigns").text
    assert '<meta http-equiv="refresh" content="5">' in live
    assert f'id="campaign-{NEWSLETTER}" data-state="sending"' in live
    one = client.get(f"/admin/campaigns/{NEWSLETTER}").text
    assert '<meta http-equiv="refresh" content="5">' in one and 'id="state">sending<' in one


def test_a_campaign_page_embeds_the_report_lists_who_did_not_get_it_and_rsvps(
    built: BuiltLog, client: Client, mailer: Mailer, frozen_reports: None
) -> None:
    log_in(client)
    page = client.get(f"/admin/campaigns/{NEWSLETTER}")
    assert page.status_code == 200
    html = page.text
    # The report's own markup (render_html), charts and tables included.
    out = io.StringIO()
    mailer.write_report(out, NEWSLETTER, "html")
    report_body = out.getvalue().split("<body>")[1].split("</body>")[0]
    assert report_body in html
    assert 'id="chart-segments"' in html and "<svg" in html and 'id="failures"' in html
    # Who did not get it, with the server's replies.
    missing = html.split('id="missing"')[1].split("</table>")[0]
    for address, (code, reply) in {**built.refused, **built.deferred}.items():
        assert address in missing and str(code) in missing
        assert reply.split(">")[-1].strip()[:20] in missing.replace("&lt;", "<").replace(
            "&gt;", ">"
        )
    for address in built.skipped:
        assert address in missing
    assert built.addresses["local-police"][20] not in missing  # sent: not listed
    for fmt in ("csv", "json", "html"):
        assert f'href="/admin/campaigns/{NEWSLETTER}/report.{fmt}"' in html

    invitation = client.get(f"/admin/campaigns/{INVITATION}").text
    assert '<p id="rsvps">2 yes, 1 no.</p>' in invitation
    assert client.get("/admin/campaigns/no-such-campaign").status_code == 404
    assert client.get("/admin/campaigns/..%2F..%2Fetc").status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=failed",
        "?status=deferred",
        "?segment=associations",
        "?segment=local-police&status=skipped",
    ],
)
def test_downloads_are_the_clis_bytes(
    built: BuiltLog, client: Client, cli: Cli, frozen_reports: None, query: str
) -> None:
    log_in(client)
    options = []
    for part in query.lstrip("?").split("&") if query else []:
        key, _, value = part.partition("=")
        options += [f"--{key}", value]
    for fmt in ("csv", "json", "html"):
        got = client.get(f"/admin/campaigns/{NEWSLETTER}/report.{fmt}{query}")
        assert got.status_code == 200, got.text
        result = cli("report", NEWSLETTER, "--format", fmt, *options)
        assert result.exit_code == 0, result.output
        assert got.content == result.stdout_bytes, (fmt, query)
        assert got.headers["content-type"].endswith("charset=utf-8")
    csv = client.get(f"/admin/campaigns/{NEWSLETTER}/report.csv{query}")
    assert csv.content.startswith("\ufeff".encode())  # the BOM Excel needs
    assert "attachment" in csv.headers["content-disposition"]


def test_bad_download_requests(built: BuiltLog, client: Client) -> None:
    log_in(client)
    base = f"/admin/campaigns/{NEWSLETTER}"
    assert client.get(f"{base}/report.xml").status_code == 404
    assert client.get(f"{base}/report.csv?status=nonsense").status_code == 400
    assert client.get(f"{base}/report.json?segment=nope").status_code == 404
    assert client.get("/admin/campaigns/nope/report.csv").status_code == 404


def test_recipient_look_up_by_address_and_organisation(
    built: BuiltLog, client: Client, db: Database
) -> None:
    log_in(client)
    refused = next(iter(built.refused))
    page = client.get("/admin/recipients", params={"q": refused.upper()})
    html = page.text
    assert page.status_code == 200
    record = html.split('id="record"')[1]
    assert "local-police" in record.split('id="segments">')[1].split("<")[0]
    assert "legitimate-interest" in record.split('id="consent">')[1].split("<")[0]
    deliveries = record.split('id="deliveries"')[1].split("</table>")[0]
    assert NEWSLETTER in deliveries and "failed" in deliveries and "550" in deliveries

    by_org = client.get("/admin/recipients", params={"q": "asociacion"})
    assert by_org.status_code == 200
    # add_recipients names every organisation "Policía Municipal" (one a formula here).
    found = client.get("/admin/recipients", params={"q": "policía municipal"}).text
    rows = found.split('id="found"')[1].split("</table>")[0]
    assert rows.count("<tr>") - 1 == 24 + 8 - 1 + 5  # the formula organisation aside
    nothing = client.get("/admin/recipients", params={"address": "ghost@nowhere.example"})
    assert "Nothing is held about ghost@nowhere.example" in nothing.text
    assert audit_whats(db).count("lookup") == 4


def test_an_opt_out_needs_the_csrf_token_and_is_audited(
    built: BuiltLog, client: Client, db: Database, mailer: Mailer
) -> None:
    log_in(client)
    address = built.addresses["associations"][5]
    page = client.get("/admin/recipients", params={"address": address})
    token = csrf_of(page.text.split('id="optout-form"')[1])

    def count() -> int:
        with db.session() as s:
            return len(
                list(
                    s.scalars(
                        select(Suppression).where(
                            Suppression.address_hash == mailer.signer.address_hash(address)
                        )
                    )
                )
            )

    before, audited = count(), len(audit_whats(db))
    form = {"address": address, "scope": "newsletter", "note": "asked by phone"}
    altered = token[:-1] + ("x" if token[-1] != "x" else "y")  # always another token
    for forged in ({}, {"csrf": ""}, {"csrf": altered}):
        refused = client.post("/admin/recipients/optout", data={**form, **forged})
        assert refused.status_code == 403
    assert count() == before and len(audit_whats(db)) == audited  # nothing changed
    done = client.post("/admin/recipients/optout", data={**form, "csrf": token})
    assert done.status_code == 303
    assert "optout-recorded" in done.headers["location"]
    assert count() == before + 1
    with db.session() as s:
        row = s.scalars(select(Suppression).order_by(Suppression.id.desc())).first()
        assert row is not None
        assert (row.reason, row.scope, row.source, row.note) == (
            "manual",
            "newsletter",
            "dashboard:maria",
            "asked by phone",
        )
        entry = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
        assert entry is not None and (entry.who, entry.what) == ("maria", "optout")
        assert address in entry.detail
    shown = client.get(done.headers["location"]).text
    assert "Opt-out recorded." in shown and "dashboard:maria" in shown
    again = client.post("/admin/recipients/optout", data={**form, "csrf": token})
    assert "optout-existed" in again.headers["location"] and count() == before + 1


def test_the_audit_page_and_command_list_dashboard_actions(
    built: BuiltLog, client: Client, cli: Cli
) -> None:
    log_in(client)
    client.get("/admin/recipients", params={"q": "asociacion"})
    client.get(f"/admin/campaigns/{NEWSLETTER}/report.csv")
    page = client.get("/admin/audit").text
    assert "download-csv" in page and "lookup" in page and ">login<" in page
    listed = cli("audit", "--user", "maria", "--format", "csv").output
    assert "download-csv,newsletter-2022-01" in listed and "lookup,asociacion" in listed
