"""Engine, sessions and schema upgrades (Alembic, from ``migrations/``).

``open_database`` is the one way in: it creates and upgrades a new database, and
refuses, naming ``clara-mail db upgrade``, one that is behind the newest migration.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from clara_mailer.core.errors import DatabaseError, SchemaOutdated
from clara_mailer.core.resources import MIGRATIONS
from clara_mailer.core.settings import Settings
from clara_mailer.store.tables import meta

if TYPE_CHECKING:  # the ORM is loaded on the first session(); reading(), writing() need none
    from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = MIGRATIONS
#: The newest migration. Every command checks the database against it, so it is a
#: constant rather than asked of Alembic, whose import costs ~0.15 s and ~18 MB; a test
#: keeps it equal to the head of migrations/.
SCHEMA_HEAD = "0006"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event (below) start transactions instead of the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers (report, web) work while a send writes; busy_timeout makes
    # writers wait for each other instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # The sender's set-based updates (UPDATE ... FROM json_each: ``deliverylog.log``)
    # gather their rows in a temporary b-tree: in memory, not in a temporary file.
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock when a transaction starts: a deferred transaction that reads and
    # then writes fails at once with SQLITE_BUSY under WAL when another process wrote in
    # between, instead of waiting for busy_timeout. Several senders share one file safely.
    # A read-only transaction (``Database.reading``) is deferred: a WAL snapshot that
    # never waits for, nor holds up, a writer.
    read_only = conn.get_execution_options().get(_READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


_READ_ONLY = "clara_read_only"


@contextmanager
def _reaching(url: str, doing: str = "open") -> Iterator[None]:
    """Turn "cannot connect" (and other driver-level failures) into one DatabaseError line:
    ``cannot {doing} the database URL: reason``, the password hidden."""
    try:
        yield
    except OperationalError as exc:
        reason = " ".join(str(exc.orig or exc).split())  # one line, whatever the driver says
        safe = make_url(url).render_as_string(hide_password=True)
        raise DatabaseError(f"cannot {doing} the database {safe}: {reason}") from None


def create_db_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database URL is not valid: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except ModuleNotFoundError as exc:
        raise DatabaseError(
            f"the driver for {parsed.drivername} is not installed ({exc.name}); "
            "for PostgreSQL: pip install 'clara-mail[postgres]'"
        ) from None


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


class Database:
    """An engine, its session factory, and the schema's migration state."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_db_engine(url)

    @cached_property
    def sessionmaker(self) -> sessionmaker[Session]:
        from sqlalchemy.orm import sessionmaker

        return sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessionmaker() as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A Core connection in one transaction, committed on success and rolled back on
        error: ``session()`` without the ORM, for the paths that must not load it (a send).
        As in a session, the transaction begins with the first statement (SQLite: BEGIN
        IMMEDIATE, ``_sqlite_begin``), so a block that runs none takes no lock."""
        with self.engine.connect() as conn:
            yield conn
            conn.commit()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A Core connection in one read-only transaction: one consistent snapshot for
        every query in it (SQLite WAL; PostgreSQL REPEATABLE READ, READ ONLY), which
        takes no write lock, and needs no ORM."""
        options: dict[str, Any] = {_READ_ONLY: True}
        if self.dialect == "postgresql":
            options.update(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with self.engine.connect().execution_options(**options) as conn, conn.begin():
            yield conn

    def current_revision(self) -> str | None:
        """The schema's revision (None: no schema); DatabaseError when unreachable."""
        with _reaching(self.url), self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            revision: str | None = conn.scalar(text("SELECT version_num FROM alembic_version"))
            return revision

    def head_revision(self) -> str | None:
        """The head of migrations/ as Alembic sees it (imports Alembic)."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(alembic_config(self.engine)).get_current_head()

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command

        with _reaching(self.url, "upgrade"):
            command.upgrade(alembic_config(self.engine), revision)

    def is_empty(self) -> bool:
        with _reaching(self.url):
            return not inspect(self.engine).get_table_names()

    def ensure_current(self) -> None:
        current = self.current_revision()
        if current is None and self.is_empty():
            self.upgrade()
            return
        if current != SCHEMA_HEAD:
            raise SchemaOutdated(
                f"the database {self.safe_url} is at schema {current or 'none'}, "
                f"not the newest ({SCHEMA_HEAD}): run `clara-mail db upgrade`"
            )

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def secret_key(self, settings: Settings) -> str:
        """The configured secret, else one generated once and kept in the database."""
        if settings.secret_key:
            return settings.secret_key
        stored = select(meta.c.value).where(meta.c.key == "secret_key")
        with self.reading() as conn:
            found: str | None = conn.scalar(stored)
            if found is not None:
                return found
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    meta.insert().values(key="secret_key", value=secrets.token_urlsafe(32))
                )
        except IntegrityError:
            pass  # another process generated it first: use theirs
        with self.reading() as conn:
            value: str = conn.execute(stored).scalar_one()
            return value

    def has_stored_secret_key(self) -> bool:
        """Whether a generated secret key is kept in the database (read only: unlike
        ``secret_key`` it never generates one, nor creates the schema)."""
        with _reaching(self.url), self.engine.connect() as conn:
            if not inspect(conn).has_table(meta.name):
                return False
            found = conn.scalar(select(meta.c.value).where(meta.c.key == "secret_key"))
            return found is not None

    def dispose(self) -> None:
        self.engine.dispose()


def secret_key_stored(url: str) -> bool:
    """Whether the database at ``url`` keeps a generated secret key; an SQLite file that
    does not exist is not created (False). DatabaseError when it cannot be read."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database URL is not valid: {url!r}") from None
    if parsed.get_backend_name() == "sqlite" and (
        not parsed.database or parsed.database == ":memory:" or not Path(parsed.database).is_file()
    ):
        return False
    db = Database(url)
    try:
        return db.has_stored_secret_key()
    finally:
        db.dispose()


def open_database(settings: Settings, *, check: bool = True) -> Database:
    db = Database(settings.database_url)
    if check:
        try:
            db.ensure_current()
        except BaseException:
            db.dispose()
            raise
    return db
