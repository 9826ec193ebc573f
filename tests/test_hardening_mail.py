"""Issue 14 items 8, 10, 21 and the rest of 25: mailto unsubscribe requests, one line
instead of a traceback, the container's inline width, `config` and the 400 page."""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from clara_mailer.core.errors import DatabaseError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import Database
from clara_mailer.store.models import Suppression
from tests.bounces_helpers import RECIPIENTS, all_samples, sample, seed, write_mbox
from tests.conftest import TEST_SECRET, settings_env

Cli = Callable[..., Result]


# --- 8: the List-Unsubscribe mailto address is read ------------------------------------


def _request(subject: str, message_id: str) -> bytes:
    return (
        "From: Someone <someone@policia-local.example>\r\n"
        "To: unsubscribe@clara.example\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 18 Jan 2022 10:00:00 +0100\r\n"
        f"Message-ID: <{message_id}@policia-local.example>\r\n"
        "\r\n"
        "This message was sent automatically to unsubscribe.\r\n"
    ).encode()


def _counts(output: str) -> dict[str, str]:
    pairs = (line.strip().split(":", 1) for line in output.splitlines() if line.startswith("  "))
    return {name: value.strip() for name, value in pairs}


def _suppressions(db: Database) -> list[Suppression]:
    with db.session() as s:
        return list(s.scalars(select(Suppression).order_by(Suppression.id)))


def test_mailto_unsubscribe_requests_are_applied_once_and_forged_ones_change_nothing(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    seed(db)
    signer = TokenSigner(TEST_SECRET)
    valid = signer.sign("u", 1, 2)  # campaign 1, recipient 2 (buzon.lleno@asociacion.example)
    forged = TokenSigner("another-secret-0123456789abcdef").sign("u", 1, 3)
    mbox = write_mbox(
        tmp_path / "unsubscribe.mbox",
        [
            sample("postfix-5.1.1.eml"),  # a bounce first: its transaction ends before
            _request(f"unsubscribe-{valid}", "req-1"),
            _request(f"unsubscribe-{forged}", "req-2"),
            _request("A question about the newsletter", "req-3"),
        ],
    )

    result = cli("bounces", "import", "--mbox", str(mbox))
    assert result.exit_code == 0, result.output
    counts = _counts(result.output)
    assert counts["unsubscribe requests"] == "1", result.output
    assert counts["opted out by mail"] == "1", result.output
    assert counts["unsubscribes refused"] == "1", result.output
    assert counts["not bounces"] == "1", result.output  # the question, left for a person

    rows = _suppressions(db)
    assert counts["hard"] == "1", result.output
    rows = [r for r in rows if r.reason != "hard-bounce"]
    assert [(r.address_hash, r.reason, r.scope, r.source, r.campaign_id) for r in rows] == [
        (signer.address_hash(RECIPIENTS[2]), "one-click", "all", "newsletter-2022-01", 1)
    ]  # as the one-click POST records it; recipient 3 (forged token) untouched

    # Read again: nothing changes (the bounce and the request are already seen). Lifted,
    # then read again: the old request is not applied a second time.
    again = cli("bounces", "import", "--mbox", str(mbox))
    assert _counts(again.output)["opted out by mail"] == "0", again.output
    assert _counts(again.output)["already seen"] == "2", again.output
    assert len(_suppressions(db)) == 2
    optin = cli("optout", "remove", RECIPIENTS[2], "--yes")
    assert optin.exit_code == 0, optin.output
    third = cli("bounces", "import", "--mbox", str(mbox))
    assert _counts(third.output)["opted out by mail"] == "0", third.output
    assert [r.lifted_at is not None for r in _suppressions(db)] == [False, True]


def test_mailto_unsubscribe_dry_run_changes_nothing(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    from clara_mailer.bounces.mailboxes import BounceSource
    from clara_mailer.mailer import Mailer

    seed(db)
    valid = TokenSigner(TEST_SECRET).sign("u", 1, 6)  # delayed only in the samples: not suppressed
    # After the samples' bounces, which the dry run flushes but never commits.
    mbox = write_mbox(
        tmp_path / "u.mbox", [*all_samples(), _request(f"unsubscribe-{valid}", "req-9")]
    )
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(mbox)), dry_run=True
    )
    assert report.unsubscribe_counts() == {
        "unsubscribe requests": 1,
        "opted out by mail": 1,
        "unsubscribes refused": 0,
    }
    assert report.bounces == 10
    assert _suppressions(db) == []


# --- 10: one line, not a traceback -------------------------------------------------------

UNREACHABLE_POSTGRES = "postgresql+psycopg://u@127.0.0.1:1/x"


def test_unreachable_database_is_one_line_for_db_upgrade_and_every_command(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clara_mailer.cli import main

    monkeypatch.chdir(tmp_path)
    env = {**settings_env(settings), "CLARA_DATABASE_URL": UNREACHABLE_POSTGRES}
    for args in (["db", "upgrade"], ["campaigns"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 2, (args, result.output, result.exception)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("Error: cannot open the database postgresql+psycopg://u@"), lines
        assert "Connection refused" in lines[0] or "connect" in lines[0], lines

    database = Database(UNREACHABLE_POSTGRES)
    try:
        for operation in (database.current_revision, database.upgrade, database.ensure_current):
            with pytest.raises(DatabaseError, match=r"cannot (open|upgrade) the database"):
                operation()
    finally:
        database.dispose()


def test_preview_to_a_missing_folder_is_one_line(cli: Cli, db: Database) -> None:
    result = cli("preview", "newsletter-2022-01", "--language", "es", "--output", "missing/x.html")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "Error: cannot write or read missing/x.html: No such file or directory"
    ]


def _run_cli(settings: Settings, tmp_path: Path, args: list[str], stdout: int) -> tuple[int, str]:
    process = subprocess.run(
        [sys.executable, "-m", "clara_mailer", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, **settings_env(settings)},
        timeout=60,
        check=False,
    )
    return process.returncode, process.stderr.decode()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("fmt", ["csv", "table", "json"])
def test_a_full_disk_is_one_line(
    settings: Settings, db: Database, tmp_path: Path, fmt: str
) -> None:
    with open("/dev/full", "wb") as full:
        code, err = _run_cli(
            settings, tmp_path, ["recipients", "list", "--format", fmt], full.fileno()
        )
    assert (code, err) == (2, "Error: cannot write the output: No space left on device\n")


def test_a_closed_pipe_ends_quietly(settings: Settings, db: Database, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has read enough
    try:
        code, err = _run_cli(
            settings, tmp_path, ["recipients", "list", "--format", "csv"], write_end
        )
    finally:
        os.close(write_end)
    assert err == ""
    assert code == 1  # click's status for a closed pipe


# --- 21: the container fits a phone without <style> --------------------------------------


def _inline_style(tag: str) -> dict[str, str]:
    found = re.search(r'\sstyle="([^"]*)"', tag)
    pairs = (part.split(":", 1) for part in (found.group(1) if found else "").split(";"))
    return {name.strip().lower(): value.strip() for name, *value in pairs for value in value}


@pytest.mark.parametrize(
    "slug", ["newsletter-2022-01", "conference-2022-02-04", "press-release-2022-02-04"]
)
@pytest.mark.parametrize("language", ["es", "en"])
def test_container_carries_inline_width_100_and_max_width_600(
    settings: Settings, db: Database, slug: str, language: str
) -> None:
    from clara_mailer.mailer import Mailer

    raw = Mailer(settings, database=db).preview(slug, language=language, fmt="eml")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    html = part.get_content()
    # What a client that strips <style> (and ignores Outlook's conditional comments) sees.
    visible = re.sub(
        r"<!--.*?-->", "", re.sub(r"<style.*?</style>", "", html, flags=re.S), flags=re.S
    )
    containers = re.findall(r'<table\b[^>]*\bclass="container"[^>]*>', visible)
    assert len(containers) == 1, containers
    style = _inline_style(containers[0])
    assert style.get("width") == "100%" and style.get("max-width") == "600px", containers[0]
    assert 'width="600"' not in containers[0], containers[0]
    # Nothing else outside the conditional comments is wider than a phone either.
    fixed = re.findall(r'(?<!max-)width:\s*[4-9]\d\dpx|\swidth="[4-9]\d\d"', visible)
    assert not fixed, fixed


# --- 25 (rest): `config` and a generated secret key; the 400 pages in both languages ----


def test_config_says_a_generated_secret_key_is_stored_without_generating_one(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clara_mailer.cli import main

    monkeypatch.chdir(tmp_path)
    env: dict[str, str | None] = {**settings_env(settings), "CLARA_SECRET_KEY": None}
    keyless = Settings(**{**vars(settings), "secret_key": None})

    def secret_line() -> str:
        result = CliRunner().invoke(main, ["config"], env=env)
        assert result.exit_code == 0, result.output
        return next(line for line in result.output.splitlines() if line.startswith("secret_key"))

    database = Database(settings.database_url)
    try:
        database.ensure_current()
        assert secret_line() == "secret_key = (not set)"
        assert not database.has_stored_secret_key()  # `config` generated nothing
        database.secret_key(keyless)  # what the first command that signs does
        assert secret_line() == "secret_key = (generated, stored in the database)"
    finally:
        database.dispose()


def test_config_creates_no_database(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clara_mailer.cli import main

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'none' / 'clara.db'}"
    env: dict[str, str | None] = {
        **settings_env(settings),
        "CLARA_DATABASE_URL": url,
        "CLARA_SECRET_KEY": None,
    }
    result = CliRunner().invoke(main, ["config"], env=env)
    assert "secret_key = (not set)" in result.output.splitlines(), result.output
    assert not (tmp_path / "none").exists()


def test_bad_requests_are_pages_in_spanish_and_english(settings: Settings, db: Database) -> None:
    import httpx

    from clara_mailer.mailer import Mailer
    from clara_mailer.web.app import create_app
    from tests.optout_seed import seed as seed_people
    from tests.web_server import serve_in_thread

    signer = TokenSigner(db.secret_key(settings))
    seeded = seed_people(db, signer)
    unsubscribe = f"/u/{signer.sign('u', seeded.newsletter_id, seeded.john_id)}"
    rsvp = f"/r/{signer.sign('r', seeded.invitation_id, seeded.john_id)}"
    with (
        serve_in_thread(create_app(Mailer(settings))) as base_url,
        httpx.Client(base_url=base_url, timeout=10) as http,
    ):
        pages = {
            "unknown action": http.post(unsubscribe, data={"action": "delete-everything"}),
            "answer by GET": http.get(f"{rsvp}?answer=maybe"),
            "answer by POST": http.post(rsvp, data={"answer": "maybe"}),
            "altered token": http.get(unsubscribe[:-1] + ("a" if unsubscribe[-1] != "a" else "b")),
        }
    for name, page in pages.items():
        assert page.status_code == 400, name
        assert page.headers["content-type"].startswith("text/html"), name
        assert '<html lang="es">' in page.text and '<h1 lang="en">' in page.text, name
    assert "Solicitud no válida" in pages["unknown action"].text
    assert "La respuesta debe ser sí o no." in pages["answer by POST"].text
    assert "The answer must be yes or no." in pages["answer by GET"].text
    assert "Enlace no válido" in pages["altered token"].text


def test_a_malformed_imap_url_is_one_line(cli: Callable[..., Result]) -> None:
    """Item 10: `--imap imap://u:pw@[::1:1` (an unclosed IPv6 literal) was a traceback."""
    result = cli("bounces", "import", "--imap", "imap://u:secret@[::1:1")
    assert result.exit_code == 2
    assert result.output.startswith("Error: IMAP URL") and result.output.count("\n") == 1
    assert "secret" not in result.output
