"""Settings, the schema and its migrations, tokens, and the CLI shell."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner, Result
from sqlalchemy import select

from clara_mailer.cli import main
from clara_mailer.core.errors import ConfigError, SchemaOutdated, TokenError
from clara_mailer.core.settings import Settings, load_settings
from clara_mailer.core.tokens import TokenSigner, verp_address, verp_token
from clara_mailer.core.vocabulary import STANDARD_SEGMENTS
from clara_mailer.store import database as db_module
from clara_mailer.store.database import Database, open_database
from clara_mailer.store.models import Base, Meta, Segment
from clara_mailer.store.tables import declare_partial_indexes
from tests.conftest import settings_env

Cli = Callable[..., Result]


# -- database and migrations ---------------------------------------------------------------


def test_new_database_is_created_with_the_standard_segments(db: Database) -> None:
    assert db.current_revision() == db.head_revision() == db_module.SCHEMA_HEAD
    with db.session() as s:
        assert set(s.scalars(select(Segment.slug))) == set(STANDARD_SEGMENTS)


def test_models_and_migrations_agree(db: Database) -> None:
    declare_partial_indexes()  # kept out of the import for speed (see store/tables.py)
    with db.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == []


def test_migrations_downgrade_and_upgrade_again(db: Database) -> None:
    from alembic import command

    command.downgrade(db_module.alembic_config(db.engine), "base")
    assert db.current_revision() is None
    db.upgrade()
    assert db.current_revision() == db.head_revision()


REAL_HEAD = db_module.SCHEMA_HEAD


@pytest.fixture
def newer_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of migrations/ with one more (empty) revision: the code is 'newer' than a
    database made before it."""
    copy = tmp_path / "migrations"
    shutil.copytree(db_module.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / "9999_later.py").write_text(
        f'revision = "9999"\ndown_revision = "{REAL_HEAD}"\nbranch_labels = None\n'
        "depends_on = None\n\n\n"
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n"
    )
    monkeypatch.setattr(db_module, "MIGRATIONS_DIR", copy)
    monkeypatch.setattr(db_module, "SCHEMA_HEAD", "9999")
    yield copy


def test_a_database_behind_the_code_is_refused_until_upgraded(
    settings: Settings, newer_migrations: Path
) -> None:
    monkeypatched_head = Database(settings.database_url)
    assert monkeypatched_head.head_revision() == "9999"
    monkeypatched_head.dispose()
    # Made at the real head with the real migrations, then opened by "newer" code.
    database = Database(settings.database_url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(db_module, "MIGRATIONS_DIR", db_module.MIGRATIONS)
        mp.setattr(db_module, "SCHEMA_HEAD", REAL_HEAD)
        database.ensure_current()
    with pytest.raises(SchemaOutdated, match="run `clara-mail db upgrade`"):
        open_database(settings)
    env = settings_env(settings)
    refused = CliRunner().invoke(main, ["segments"], env=env)
    assert refused.exit_code == 2
    assert refused.output.startswith("Error:") and "clara-mail db upgrade" in refused.output
    assert refused.output.count("\n") == 1
    upgraded = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert f"{REAL_HEAD} -> 9999" in upgraded.output
    assert CliRunner().invoke(main, ["segments"], env=env).exit_code == 0
    database.dispose()


def test_secret_key_is_generated_once_and_kept(settings: Settings) -> None:
    unset = Settings(**{**vars(settings), "secret_key": None})
    first = open_database(unset)
    key = first.secret_key(unset)
    assert len(key) >= 32
    first.dispose()
    second = open_database(unset)
    assert second.secret_key(unset) == key
    with second.session() as s:
        assert s.get(Meta, "secret_key") is not None
    # A configured key wins and is never stored.
    assert second.secret_key(settings) == settings.secret_key
    second.dispose()


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = {"CLARA_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"}
    result = CliRunner().invoke(main, ["segments"], env=env)
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot open the database")
    assert result.output.count("\n") == 1


# -- settings -------------------------------------------------------------------------------


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    (tmp_path / "clara-mail.toml").write_text(
        'smtp_url = "smtp://file.example:587"\nbase_url = "https://file.example"\nretry_max = 60\n'
    )
    settings = load_settings(tmp_path, {"CLARA_SMTP_URL": "smtp://env.example:25?tls=none"})
    assert settings.smtp_url == "smtp://env.example:25?tls=none"
    assert settings.base_url == "https://file.example"
    assert settings.retry_max == 60
    assert load_settings(tmp_path, {}).database_url == "sqlite:///clara-mail.db"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("smtp_url = \n", {}, "clara-mail.toml"),
        ('smtp_ur1 = "x"\n', {}, "unknown setting 'smtp_ur1'"),
        ("", {"CLARA_RETRY_MAX": "soon"}, "CLARA_RETRY_MAX: retry_max must be a number"),
        ("", {"CLARA_BASE_URL": "clara.example"}, "base_url must start with http"),
    ],
)
def test_bad_settings_are_one_clear_error(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    (tmp_path / "clara-mail.toml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(tmp_path, env)


def test_config_command_masks_passwords_and_keys(tmp_path: Path) -> None:
    env = {
        "CLARA_SMTP_URL": "smtp://clara:hunter2@relay.example:587",
        "CLARA_DATABASE_URL": "postgresql+psycopg://clara:s3cret@db.example/clara",
        "CLARA_SECRET_KEY": "do-not-print-this-key-0123456789",
    }
    result = CliRunner().invoke(main, ["config"], env=env)
    assert result.exit_code == 0
    assert "hunter2" not in result.output and "s3cret" not in result.output
    assert "do-not-print" not in result.output
    assert "smtp_url = smtp://clara:***@relay.example:587" in result.output


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_round_trip_and_reject_any_change() -> None:
    signer = TokenSigner("k" * 32)
    token = signer.sign("u", 12, 987654)
    assert len(token) <= 40 and token == token.lower()
    data = signer.verify("u", token)
    assert (data.campaign_id, data.recipient_id) == (12, 987654)
    for i in range(len(token)):
        altered = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1 :]
        with pytest.raises(TokenError):
            signer.verify("u", altered)
    with pytest.raises(TokenError):
        signer.verify("r", token)  # an unsubscribe token is no RSVP token
    with pytest.raises(TokenError):
        TokenSigner("other-key-" * 4).verify("u", token)
    for junk in ("", "!!!", "a" * 200):
        with pytest.raises(TokenError):
            signer.verify("u", junk)


def test_verp_and_address_hashes() -> None:
    signer = TokenSigner("k" * 32)
    token = signer.sign("b", 3, 4)
    address = verp_address("bounces@clara.example", token)
    assert address == f"bounces+{token}@clara.example"
    assert verp_token(address.upper().lower()) == token
    assert verp_token("bounces@clara.example") is None
    assert signer.address_hash(" Ana@Policia.Example ") == signer.address_hash(
        "ana@policia.example"
    )
    assert signer.address_hash("ana@policia.example") != TokenSigner("j" * 32).address_hash(
        "ana@policia.example"
    )


# -- the CLI shell --------------------------------------------------------------------------


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_has_help_with_an_example() -> None:
    names = []
    for name, _command in _commands(main):
        result = CliRunner().invoke(main, [*name.split(), "--help"])
        assert result.exit_code == 0, name
        assert "example" in result.output.lower(), f"`clara-mail {name} --help` shows no example"
        names.append(name)
    for expected in (
        "import",
        "segments create",
        "send",
        "report",
        "campaigns",
        "check",
        "preview",
        "serve",
        "optout add",
        "recipients erase",
        "bounces import",
        "db upgrade",
        "init",
        "new",
        "recipients add",
    ):
        assert expected in names


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "clara_mailer", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0 and "clara-mail" in result.stdout
