"""PostgreSQL, a large file: the memberships' foreign keys are dropped for the load and
added back before the commit (one check of the whole table instead of one per row).
When that cannot be done (the table is busy, the role does not own it) the import
checks row by row; when the import fails, its rollback brings the keys back unchanged.

The threshold is lowered so that small files take this way. A key dropped and added
back gets a new oid: that is how these tests see which way was taken."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.registry import importer
from clara_mailer.registry.importer import ImportOptions, ImportReport
from clara_mailer.store.database import Database, open_database

from .conftest import PG_URL, TEST_SECRET, _new_postgres_database
from .registry_helpers import members_of, membership_keys, registry_state, write

pytestmark = pytest.mark.skipif(not PG_URL, reason="needs CLARA_TEST_POSTGRES_URL")

HEADER = "email,name,segment\n"


def _rows(start: int, count: int, segment: str = "associations") -> str:
    return "".join(f"p{n}@bulk.example,Persona {n},{segment}\n" for n in range(start, count))


@pytest.fixture
def url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(importer, "_BULK_ROWS", 1)
    url, drop = _new_postgres_database()
    try:
        open_database(Settings(database_url=url, secret_key=TEST_SECRET)).dispose()
        yield url
    finally:
        drop()


def _import(url: str, path: Path, options: ImportOptions | None = None) -> ImportReport:
    mailer = Mailer(Settings(database_url=url, secret_key=TEST_SECRET))
    try:
        [report] = mailer.import_files([path], options or ImportOptions(chunk_size=4))
    finally:
        mailer.close()
    return report


def _open(url: str) -> Database:
    return open_database(Settings(database_url=url, secret_key=TEST_SECRET))


def test_a_busy_membership_table_is_checked_row_by_row(url: str, tmp_path: Path) -> None:
    db = _open(url)
    before = membership_keys(db)
    path = write(tmp_path, "big.csv", HEADER + _rows(0, 20))
    holder = create_engine(url)
    try:
        with holder.connect() as conn:
            # Another session reading the table: the import must not wait for it (nor
            # make it wait); its drop gives up after _BULK_LOCK_WAIT.
            conn.execute(text("LOCK TABLE recipient_segments IN ACCESS SHARE MODE"))
            reports: list[ImportReport] = []
            importing = threading.Thread(target=lambda: reports.append(_import(url, path)))
            importing.start()
            importing.join(timeout=30)
            waited = importing.is_alive()
            conn.rollback()  # the lock goes: an import still waiting for it ends now
            importing.join()
    finally:
        holder.dispose()
    assert not waited, "the import waited for the table's lock"
    assert [report.added for report in reports] == [20]
    assert membership_keys(db) == before  # same oids: never dropped
    assert len(members_of(db, "associations")) == 20
    db.dispose()


def test_a_role_that_does_not_own_the_tables_is_checked_row_by_row(
    url: str, tmp_path: Path
) -> None:
    role = f"clara_importer_{uuid.uuid4().hex[:8]}"
    owner = create_engine(url, isolation_level="AUTOCOMMIT")
    with owner.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    try:
        db = _open(url)
        before = membership_keys(db)
        as_role = make_url(url).set(username=role, password=None)
        path = write(tmp_path, "big.csv", HEADER + _rows(0, 20))
        assert _import(as_role.render_as_string(hide_password=False), path).added == 20
        assert membership_keys(db) == before
        assert len(members_of(db, "associations")) == 20
        db.dispose()
    finally:
        with owner.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        owner.dispose()


def test_a_refused_file_leaves_the_keys_and_the_registry_as_they_were(
    url: str, tmp_path: Path
) -> None:
    assert _import(url, write(tmp_path, "first.csv", HEADER + _rows(0, 3))).added == 3
    db = _open(url)
    before_keys, before_state = membership_keys(db), registry_state(db)
    # --strict: a bad row at the end refuses the whole file, after the keys were dropped
    # and the rows copied.
    path = write(tmp_path, "big.csv", HEADER + _rows(3, 20) + "not-an-address,X,media\n")
    report = _import(url, path, ImportOptions(chunk_size=4, strict=True))
    assert (report.added, report.rejected, report.committed) == (17, 1, False)
    assert membership_keys(db) == before_keys
    assert registry_state(db) == before_state
    db.dispose()


def test_a_large_file_drops_and_restores_the_keys(url: str, tmp_path: Path) -> None:
    db = _open(url)
    before = membership_keys(db)
    path = write(tmp_path, "big.csv", HEADER + _rows(0, 20) + _rows(0, 5, "media"))
    assert _import(url, path).added == 20
    after = membership_keys(db)
    assert [key[1:] for key in after] == [key[1:] for key in before]
    assert {key[0] for key in after}.isdisjoint(key[0] for key in before)
    assert members_of(db, "media") == [f"p{n}@bulk.example" for n in range(5)]
    # The keys are enforced again: a membership of no recipient is refused.
    with db.engine.connect() as conn, pytest.raises(Exception, match="foreign key"):
        conn.execute(
            text("INSERT INTO recipient_segments (recipient_id, segment_id) VALUES (-1, 1)")
        )
    db.dispose()
