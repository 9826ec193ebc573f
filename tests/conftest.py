"""Shared fixtures: every database test runs on a real SQLite file and, when
CLARA_TEST_POSTGRES_URL names a server (``.ci/run`` starts one), on PostgreSQL too."""

from __future__ import annotations

import gc
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import Database, open_database
from tests.install_helpers import installed_venv, wheel
from tests.optout_seed import Seeded, seed

__all__ = ["installed_venv", "wheel"]  # session fixtures: one wheel for the whole run

PG_URL = os.environ.get("CLARA_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]
TEST_SECRET = "test-secret-key-0123456789abcdef"
#: A configured sender's legal footer (sending over SMTP is refused without it).
LEGAL_FOOTER = {
    "sender_legal_name": "Observatorio Español del Racismo y la Xenofobia (muestra)",
    "sender_postal_address": "Dirección postal de ejemplo",
    "controller_contact": "privacidad@oberaxe.example",
    "privacy_url": "https://clara.example/privacidad",
}
#: The checkout: the seed CSV files and the sources the tests read live here.
REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI") and not PG_URL:
        raise pytest.UsageError("CI must run the suite on PostgreSQL: set CLARA_TEST_POSTGRES_URL")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CLARA_* variable from outside; work in an empty folder (for CLI tests on a
    project folder: ``pytestmark = pytest.mark.usefixtures("clean_environment")``)."""
    for name in list(os.environ):
        if name.startswith("CLARA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLARA_SECRET_KEY", TEST_SECRET)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so a socket or connection left open fails the test that
    leaked it (warnings are errors) rather than a random later one."""
    yield
    gc.collect()


def _new_postgres_database(template: str | None = None) -> tuple[str, Callable[[], None]]:
    """A new database on the test server (a copy of ``template`` when given), and the
    function that drops it. Names are random, so parallel workers never share one."""
    assert PG_URL
    name = f"clara_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    copy = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    return url, drop


def _upgraded(url: str) -> None:
    """Create and upgrade the schema at ``url`` the way every command does."""
    open_database(Settings(database_url=url, secret_key=TEST_SECRET)).dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file upgraded by Alembic per session, copied for each test that asks
    for ``db`` (the upgrade itself is tested on empty databases: test_foundation, cli)."""
    path = tmp_path_factory.mktemp("template") / "clara-mail.db"
    url = f"sqlite:///{path}"
    _upgraded(url)
    engine = create_engine(url)
    with engine.connect() as conn:  # everything in the main file, no -wal beside it
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def _postgres_template() -> Iterator[str]:
    """One PostgreSQL database upgraded by Alembic per session (per xdist worker), the
    template of each test database that asks for ``db``."""
    url, drop = _new_postgres_database()
    try:
        _upgraded(url)
        name = make_url(url).database
        assert name
        yield name
    finally:
        drop()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new database for the test: empty, or, when the test asks for ``db`` (which
    would upgrade it first thing anyway), a copy of a session's upgraded template."""
    migrated = "db" in request.fixturenames
    if request.param == "sqlite":
        path = tmp_path / "clara-mail.db"
        if migrated:
            shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    template = request.getfixturevalue("_postgres_template") if migrated else None
    url, drop = _new_postgres_database(template)
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        outbox_dir=tmp_path / "outbox",
        secret_key=TEST_SECRET,
        base_url="https://clara.example",
        templates_dir=EMAIL_TEMPLATES,
        **LEGAL_FOOTER,
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = open_database(settings)
    yield database
    database.dispose()


def settings_env(settings: Settings) -> dict[str, str]:
    """The CLARA_* variables that reproduce ``settings`` for a CLI run or subprocess."""
    env = {}
    for key, value in vars(settings).items():
        if value is not None:
            env[f"CLARA_{key.upper()}"] = str(value)
    return env


@pytest.fixture
def cli(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    """Run ``clara-mail ARGS`` in-process with click's CliRunner, in tmp_path."""
    from clara_mailer.cli import main

    monkeypatch.chdir(tmp_path)
    env = settings_env(settings)

    def run(*args: str, input: str | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(main, list(args), env=env, input=input, catch_exceptions=False)

    return run


# -- the web app over real HTTP, on a seeded registry (test_web, test_hardening_web, ...) --


@pytest.fixture
def signer(db: Database, settings: Settings) -> TokenSigner:
    return TokenSigner(db.secret_key(settings))


@pytest.fixture
def seeded(db: Database, signer: TokenSigner) -> Seeded:
    return seed(db, signer)


@pytest.fixture
def client(settings: Settings, seeded: Seeded) -> Iterator[httpx.Client]:
    """An HTTP client talking to the app served by uvicorn on 127.0.0.1 (a test module may
    define its own ``client``)."""
    from clara_mailer.mailer import Mailer
    from clara_mailer.web.app import create_app
    from tests.web_server import serve_in_thread

    with (
        serve_in_thread(create_app(Mailer(settings))) as base_url,
        httpx.Client(base_url=base_url, timeout=10) as http,
    ):
        yield http
