"""The import's two write paths give the same registry: SQLite (multi-row INSERT ... ON
CONFLICT DO NOTHING with the ids its write lock allows) and PostgreSQL (a look-up, then
COPY of the new rows and memberships). Same awkward files, small chunks so that
duplicates meet rows of earlier chunks, then the registries, the reports and the rejects
files are compared.

The PostgreSQL half runs on the real server when CLARA_TEST_POSTGRES_URL is set; the
SQLite half always runs on its own against hand-written expectations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.optouts import suppressions
from clara_mailer.registry import importer
from clara_mailer.registry.importer import ImportOptions, ImportReport
from clara_mailer.store.database import Database, open_database

from .conftest import LEGAL_FOOTER, PG_URL, TEST_SECRET, _new_postgres_database
from .registry_helpers import membership_keys, registry_state, write

HEADER = "email;name;organisation;segment;language;country;consent basis;source\n"
#: Known before the tricky file: one to gain a segment, one to be updated, one unchanged.
FIRST = (
    HEADER + "known@asso.example;Known;Asso;associations;es;ES;;\n"
    "update@asso.example;Old Name;Old Org;local-police;en;;consent;web form\n"
    "same@asso.example;Same;Same Org;associations;es;;;\n"
)
TRICKY = (
    HEADER
    # new, with every consent field and non-ASCII text
    + "Ana@Policía.example;Ana Pérez Núñez;Policía Local de Elche;local-police;español;"
    "España;interés legítimo;feria de 2021\n"
    "bob@asso.example;Bob;Asso;associations|national-authorities;en;es;contrato;\n"
    # duplicate in the same chunk (case variant): segments merged into the first
    "BOB@asso.example;Bob 2;Other;media;en;;;\n"
    "cat@asso.example;Cat \\ Backslash;Org\twith tab;associations;;;;\n"
    # known addresses: gains a segment, updated (--update), unchanged
    "KNOWN@asso.example;;;local-police;es;;;\n"
    "update@asso.example;New Name;New Org;local-police;en;;;\n"
    "same@asso.example;;;associations;;;;\n"
    # bad rows
    "not-an-address;X;Y;associations;es;;;\n"
    "dan@asso.example;Dan;Org;associations;fr;;;\n"
    "eve@asso.example;Eve\n"
    "fay@asso.example;Fay;Org;<b>;es;;;\n"
    "gus@asso.example;Gus;Org;associations;es;Portugal y España;;\n"
    "hal@asso.example;Hal;Org;associations;es;;whim;\n"
    # suppressed (opted out, bounced), then their duplicate
    "gone@asso.example;Gone;Org;associations;es;;;\n"
    "bounced@asso.example;Bounced;Org;associations;es;;;\n"
    "GONE@asso.example;Gone again;Org;associations;es;;;\n"
    # duplicates of rows in earlier chunks, one bringing a new segment
    "ana@policía.example;Ana again;X;associations;en;;;\n"
    "cat@ASSO.example;Cat again;X;associations;;;;\n"
    'ivy@asso.example;"Ivy\r\nBcc: x@y.example";"\u202eOrg";associations;en;;;\n'
    "new@asso.example;New;Org;Nuevo Segmento;es;;;\n"
    + "".join(f"p{n}@bulk.example;Persona {n};Org {n % 7};associations;es;;;\n" for n in range(40))
    + "p3@BULK.example;dup;dup;media;es;;;\n"
)


def _settings(url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=url,
        outbox_dir=tmp_path / "outbox",
        secret_key=TEST_SECRET,
        base_url="https://clara.example",
        sender_legal_name=LEGAL_FOOTER["sender_legal_name"],
        sender_postal_address=LEGAL_FOOTER["sender_postal_address"],
        controller_contact=LEGAL_FOOTER["controller_contact"],
        privacy_url=LEGAL_FOOTER["privacy_url"],
    )


def _import_both_files(db: Database, settings: Settings, tmp_path: Path) -> dict[str, Any]:
    """FIRST, then TRICKY with --update --create-segments in chunks of 3; what it left."""
    signer = TokenSigner(db.secret_key(settings))
    with db.session() as s:
        suppressions.suppress(s, signer, "Gone@Asso.example", reason="unsubscribe")
        suppressions.suppress(s, signer, "bounced@asso.example", reason="hard-bounce")
    mailer = Mailer(settings, database=db)
    folder = tmp_path / "in"
    folder.mkdir(parents=True)
    out = tmp_path / "rejects"
    out.mkdir(parents=True)
    [first] = mailer.import_files([write(folder, "first.csv", FIRST)], ImportOptions(rejects=out))
    assert first.added == 3
    options = ImportOptions(chunk_size=3, update=True, create_segments=True, rejects=out)
    [report] = mailer.import_files([write(folder, "tricky.csv", TRICKY)], options)
    state = registry_state(db)
    # The times are each run's own clock.
    state["recipients"] = [row[:-1] for row in state["recipients"]]
    assert report.rejects_path is not None
    return {
        "state": state,
        "report": _comparable(report),
        "rejects": report.rejects_path.read_bytes(),
    }


def _comparable(report: ImportReport) -> dict[str, Any]:
    fields = asdict(report)
    del fields["path"], fields["rejects_path"]
    return fields


@pytest.fixture
def sqlite_result(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = _settings(f"sqlite:///{tmp_path / 'lite.db'}", tmp_path)
    db = open_database(settings)
    try:
        yield _import_both_files(db, settings, tmp_path / "lite")
    finally:
        db.dispose()


def test_sqlite_path_on_the_tricky_file(sqlite_result: dict[str, Any]) -> None:
    report = sqlite_result["report"]
    # 20 + 40 + 1 rows read: added ana, bob, cat, ivy, new and 40 bulk; known gains a
    # segment, update is updated, same is unchanged; duplicates: BOB, ana again, cat
    # again, p3; rejected: 6 bad rows and 3 suppressed (GONE is in a later chunk than
    # gone: rejected again, not a duplicate).
    assert report["read"] == 61
    assert (report["added"], report["updated"], report["gained_segment"]) == (45, 1, 1)
    assert (report["unchanged"], report["duplicates"], report["rejected"]) == (1, 4, 9)
    assert report["created_segments"] == ["nuevo-segmento"]
    assert [r["reason"][:14] for r in report["sample_rejects"]] == [
        "bad address 'n",
        "unknown langua",
        "too few column",
        "segment '<b>' ",
        "country 'Portu",
        "unknown consen",
        "opted out",
        "suppressed (ha",
        "opted out",
    ]
    recipients = {row[0]: row[1:] for row in sqlite_result["state"]["recipients"]}
    assert recipients["ana@policía.example"] == (
        "Ana@policía.example",
        "Ana Pérez Núñez",
        "Policía Local de Elche",
        "es",
        "ES",
        "legitimate-interest",
        "feria de 2021",
    )
    assert recipients["bob@asso.example"][1:6] == ("Bob", "Asso", "en", "ES", "contract")
    assert recipients["cat@asso.example"][1:3] == ("Cat \\ Backslash", "Org with tab")
    assert recipients["ivy@asso.example"][1:3] == ("Ivy Bcc: x@y.example", "Org")
    assert recipients["update@asso.example"][1:3] == ("New Name", "New Org")
    assert recipients["same@asso.example"][1:3] == ("Same", "Same Org")
    assert recipients["p0@bulk.example"][5:] == ("legitimate-interest", "import of tricky.csv")
    assert "gone@asso.example" not in recipients and "bounced@asso.example" not in recipients
    members = set(sqlite_result["state"]["members"])
    assert {("bob@asso.example", s) for s in ("associations", "national-authorities", "media")} <= (
        members
    )
    assert ("ana@policía.example", "associations") in members  # from its later duplicate
    assert ("known@asso.example", "local-police") in members
    assert ("p3@bulk.example", "media") in members
    assert ("new@asso.example", "nuevo-segmento") in members
    assert len(recipients) == 48


@pytest.mark.skipif(not PG_URL, reason="needs CLARA_TEST_POSTGRES_URL")
@pytest.mark.parametrize("bulk", [False, True], ids=["checked-by-row", "checked-in-bulk"])
def test_postgresql_copy_path_gives_the_same_registry(
    sqlite_result: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk: bool
) -> None:
    """Both ways PostgreSQL checks the memberships' foreign keys: row by row (small files)
    and, for a large file, by dropping the keys and adding them back (here the threshold
    is lowered so that these small files take that way)."""
    if bulk:
        monkeypatch.setattr(importer, "_BULK_ROWS", 1)
    url, drop = _new_postgres_database()
    try:
        settings = _settings(url, tmp_path)
        db = open_database(settings)
        try:
            before = membership_keys(db)
            postgresql_result = _import_both_files(db, settings, tmp_path / "pg")
            after = membership_keys(db)
        finally:
            db.dispose()
    finally:
        drop()
    # The same keys either way; re-created (new oids) only when checked in bulk.
    assert [key[1:] for key in after] == [key[1:] for key in before]
    assert len(before) == 2 and all(validated for *_, validated in after)
    assert ({key[0] for key in after} != {key[0] for key in before}) is bulk
    assert postgresql_result["report"] == sqlite_result["report"]
    assert postgresql_result["state"] == sqlite_result["state"]
    assert postgresql_result["rejects"] == sqlite_result["rejects"]
