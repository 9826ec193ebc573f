"""Bounces read from a real IMAP server: Dovecot, started by .ci/start-dovecot.sh.

CI starts it and exports CLARA_TEST_IMAP_URL; without that variable the fixture runs the
script itself when Dovecot is installed, and skips only when it is absent.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from clara_mailer.bounces.mailboxes import PROCESSED_KEYWORD, BounceSource
from clara_mailer.core.errors import BounceError
from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from tests.bounces_helpers import all_samples, bounce_rows, delivery_status, seed

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "start-dovecot.sh"
PLAIN_REPLY = (
    b"From: someone@pamplona.example\r\nTo: bounces@clara.example\r\n"
    b"Subject: Re: Resultados del proyecto CLARA\r\nMessage-ID: <thanks1@pamplona.example>\r\n"
    b"Date: Tue, 25 Jan 2022 12:00:00 +0000\r\n\r\nGracias, muy interesante.\r\n"
)


@pytest.fixture(scope="session")
def imap_url() -> Iterator[str]:
    url = os.environ.get("CLARA_TEST_IMAP_URL")
    if url:
        yield url
        return
    if not (shutil.which("dovecot") or Path("/usr/sbin/dovecot").exists()):
        pytest.skip("Dovecot is not installed (apt-get install dovecot-imapd)")
    if os.geteuid() != 0:
        pytest.skip(
            "starting Dovecot needs root; run .ci/start-dovecot.sh and set CLARA_TEST_IMAP_URL"
        )
    out = subprocess.run(
        ["bash", str(SCRIPT)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    url = next(
        line.split("=", 1)[1]
        for line in out.splitlines()
        if line.startswith("CLARA_TEST_IMAP_URL=")
    )
    try:
        yield url
    finally:
        if "CLARA_DOVECOT_STARTED=1" in out.splitlines():  # stop only what we started
            subprocess.run(["bash", str(SCRIPT), "stop"], check=False, timeout=60)


class Imap:
    """A test-side IMAP client: a fresh folder per test, seeded by APPEND."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.client = imaplib.IMAP4(parts.hostname or "127.0.0.1", parts.port or 143, timeout=10)
        self.client.login(parts.username or "", parts.password or "")
        self.folders: list[str] = []

    def new_folder(self, messages: list[bytes]) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        assert self.client.create(name)[0] == "OK"
        self.folders.append(name)
        for raw in messages:
            typ, data = self.client.append(name, "", imaplib.Time2Internaldate(time.time()), raw)
            assert typ == "OK", data
        return name

    def flags(self, folder: str) -> list[set[str]]:
        """The flags of each message in ``folder``, in order."""
        self.client.select(folder, readonly=True)
        _typ, data = self.client.fetch("1:*", "(FLAGS)")
        self.client.close()
        if data == [None]:
            return []
        out = []
        for item in data:
            text = item.decode() if isinstance(item, bytes) else str(item)
            inside = text.split("FLAGS (", 1)[1].split(")", 1)[0]
            out.append(set(inside.split()))
        return out

    def count(self, folder: str) -> int:
        typ, data = self.client.status(folder, "(MESSAGES)")
        assert typ == "OK"
        return int(data[0].decode().rsplit("MESSAGES ", 1)[1].rstrip(")"))

    def close(self) -> None:
        for name in self.folders:
            self.client.delete(name)
        self.client.logout()


@pytest.fixture
def imap(imap_url: str) -> Iterator[Imap]:
    client = Imap(imap_url)
    yield client
    client.close()


def _source(url: str, folder: str, **kw: object) -> BounceSource:
    return BounceSource("imap", url, folder=folder, **kw)  # type: ignore[arg-type]


def test_imap_import_flags_messages_and_second_run_reads_nothing(
    db: Database, settings: Settings, imap: Imap, imap_url: str
) -> None:
    seed(db)
    folder = imap.new_folder([*all_samples(), PLAIN_REPLY])

    first = Mailer(settings, database=db).import_bounces(_source(imap_url, folder))

    assert (first.read, first.bounces, first.hard, first.auto_replies, first.not_bounces) == (
        12, 10, 5, 1, 1,
    )  # fmt: skip
    flags = imap.flags(folder)
    handled, reply = flags[:-1], flags[-1]
    assert all({"\\Seen", PROCESSED_KEYWORD} <= f for f in handled)
    # The plain reply stays unread for a person, but is not read again.
    assert PROCESSED_KEYWORD in reply and "\\Seen" not in reply
    rows = (bounce_rows(db), delivery_status(db))

    second = Mailer(settings, database=db).import_bounces(_source(imap_url, folder))

    assert (second.read, second.bounces, second.already_seen) == (0, 0, 0)
    assert (bounce_rows(db), delivery_status(db)) == rows
    assert imap.count(folder) == 12


def test_imap_move_to(db: Database, settings: Settings, imap: Imap, imap_url: str) -> None:
    seed(db)
    folder = imap.new_folder([*all_samples(), PLAIN_REPLY])
    done = f"{folder}-done"
    imap.folders.append(done)

    report = Mailer(settings, database=db).import_bounces(_source(imap_url, folder, move_to=done))

    assert report.hard == 5
    assert imap.count(folder) == 1  # only the plain reply is left where it was
    assert imap.count(done) == 11
    assert all({"\\Seen", PROCESSED_KEYWORD} <= f for f in imap.flags(done))


def test_imap_delete_when_asked(
    db: Database, settings: Settings, imap: Imap, imap_url: str
) -> None:
    seed(db)
    folder = imap.new_folder([*all_samples(), PLAIN_REPLY])
    report = Mailer(settings, database=db).import_bounces(_source(imap_url, folder, delete=True))
    assert report.read == 12 and len(bounce_rows(db)) == 10
    assert imap.count(folder) == 1


def test_imap_dry_run_leaves_the_mailbox_alone(
    db: Database, settings: Settings, imap: Imap, imap_url: str
) -> None:
    seed(db)
    folder = imap.new_folder(all_samples())
    dry = Mailer(settings, database=db).import_bounces(_source(imap_url, folder), dry_run=True)
    assert dry.hard == 5 and bounce_rows(db) == []
    assert all(not f & {"\\Seen", PROCESSED_KEYWORD} for f in imap.flags(folder))
    real = Mailer(settings, database=db).import_bounces(_source(imap_url, folder))
    assert real.read == 11 and real.hard == 5


def test_imap_bad_credentials(db: Database, settings: Settings, imap_url: str) -> None:
    parts = urlsplit(imap_url)
    bad = imap_url.replace(f":{parts.password}@", ":not-the-password@")
    with pytest.raises(BounceError) as caught:
        Mailer(settings, database=db).import_bounces(_source(bad, "INBOX"))
    message = str(caught.value)
    assert message.startswith(f"IMAP login to 127.0.0.1:{parts.port} as 'clara' failed: ")
    assert "AUTHENTICATIONFAILED" in message and "not-the-password" not in message
    assert "\n" not in message


def test_imap_missing_folder(db: Database, settings: Settings, imap_url: str) -> None:
    with pytest.raises(
        BounceError, match=r"IMAP folder 'No-Such-Folder' on 127\.0\.0\.1:\d+ cannot be opened"
    ):
        Mailer(settings, database=db).import_bounces(_source(imap_url, "No-Such-Folder"))


def test_cli_imap(cli: Callable[..., object], db: Database, imap: Imap, imap_url: str) -> None:
    seed(db)
    folder = imap.new_folder(all_samples())
    result = cli("bounces", "import", "--imap", imap_url, "--folder", folder)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    output: str = result.output  # type: ignore[attr-defined]
    assert "clara-test-pw" not in output  # the password is masked in the summary
    assert "  hard:                 5" in output.splitlines()
    bad = cli("bounces", "import", "--imap", imap_url.replace("clara-test-pw", "nope"))
    assert bad.exit_code == 2  # type: ignore[attr-defined]
    assert bad.output.startswith("Error: IMAP login to 127.0.0.1:")  # type: ignore[attr-defined]
    assert bad.output.count("\n") == 1  # type: ignore[attr-defined]
