"""Shared fixtures: every database test runs on a real SQLite file and, when
CLARA_TEST_POSTGRES_URL names a server (``.ci/run`` starts one), on PostgreSQL too."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database, open_database

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


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so a socket or connection left open fails the test that
    leaked it (warnings are errors) rather than a random later one."""
    yield
    gc.collect()


def _new_postgres_database() -> tuple[str, Callable[[], None]]:
    assert PG_URL
    name = f"clara_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    return url, drop


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'clara-mail.db'}"
        return
    url, drop = _new_postgres_database()
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
