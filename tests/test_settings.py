"""Settings are checked when they are loaded: a bad value is one line naming the setting and
where it came from (clara-mail.toml or a CLARA_* variable), exit 2, never a traceback."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_mailer.cli import main
from clara_mailer.core.errors import ConfigError
from clara_mailer.core.settings import (
    CONFIG_FILE,
    SECRET_KEY_MIN_BYTES,
    Settings,
    load_settings,
    mask_url,
    normalise_database_url,
)
from clara_mailer.core.tokens import TokenSigner

SETTINGS = [f.name for f in fields(Settings)]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CLARA_* setting from the outer environment, no clara-mail.toml but the test's."""
    for name in SETTINGS:
        monkeypatch.delenv(f"CLARA_{name.upper()}", raising=False)
    monkeypatch.chdir(tmp_path)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_line_error(result: Result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # the exit status, not an error
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for text in expected:
        assert text in result.stderr


# -- through the CLI ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "CLARA_RETRY_IN_RUN",
            "abc",
            "CLARA_RETRY_IN_RUN: retry_in_run must be seconds separated by commas, not 'abc'",
        ),
        ("CLARA_RETRY_IN_RUN", "5,-1", "CLARA_RETRY_IN_RUN: retry_in_run must be seconds"),
        ("CLARA_RETRY_MAX", "soon", "CLARA_RETRY_MAX: retry_max must be a number"),
        ("CLARA_RETRY_EXPIRE", "1e30", "CLARA_RETRY_EXPIRE: retry_expire must be a number"),
        ("CLARA_CLAIM_BATCH", "0", "CLARA_CLAIM_BATCH: claim_batch must be a number"),
        ("CLARA_SMTP_TIMEOUT", "nan", "CLARA_SMTP_TIMEOUT: smtp_timeout must be a number"),
        ("CLARA_LEASE_SECONDS", "2.5", "CLARA_LEASE_SECONDS: lease_seconds must be a number"),
        ("CLARA_BASE_URL", "clara.example", "CLARA_BASE_URL: base_url must start with http"),
        ("CLARA_BASE_URL", "https://", "CLARA_BASE_URL: base_url names no host"),
        ("CLARA_BASE_URL", "https://clarä.example", "CLARA_BASE_URL: base_url must be ASCII"),
        (
            "CLARA_SMTP_URL",
            "smtp://u:pw@[::1:1",
            "CLARA_SMTP_URL: smtp_url is not a valid URL (Invalid IPv6 URL): 'smtp://u:***@[::1:1'",
        ),
        ("CLARA_SMTP_URL", "smtp://relay.example:port", "smtp_url is not a valid URL"),
        ("CLARA_SMTP_URL", "relay.example:587", "smtp_url must start with smtp:// or smtps://"),
        (
            "CLARA_DATABASE_URL",
            "mysql://clara:pw@db.example/clara",
            "CLARA_DATABASE_URL: database_url must start with sqlite:/// (a file) or "
            "postgresql+psycopg:// (a server), not 'mysql://clara:***@db.example/clara'",
        ),
        ("CLARA_BOUNCE_ADDRESS", "bounces", "CLARA_BOUNCE_ADDRESS: bounce_address must be an"),
        ("CLARA_DKIM_SELECTOR", "s2022", "CLARA_DKIM_SELECTOR: dkim_selector is set, so DKIM"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(variable: str, value: str, expected: str) -> None:
    result = run("config", env={variable: value})
    assert_one_line_error(result, expected)
    assert "pw@" not in result.output


def test_config_no_longer_shows_a_bad_value() -> None:
    result = run("config", env={"CLARA_RETRY_IN_RUN": "abc"})
    assert_one_line_error(result)
    assert "retry_in_run = abc" not in result.output


def test_a_short_secret_key_is_refused_at_load_without_showing_it(tmp_path: Path) -> None:
    env = {"CLARA_SECRET_KEY": "short", "CLARA_DATABASE_URL": f"sqlite:///{tmp_path}/c.db"}
    result = run("optout", "add", "a@x.example", env=env)
    assert_one_line_error(
        result, "CLARA_SECRET_KEY: secret_key must be at least 16 bytes long (this one has 5)"
    )
    assert "short" not in result.output
    assert not (tmp_path / "c.db").exists()  # refused before anything was opened


def test_the_minimum_key_length_is_what_the_signer_needs() -> None:
    with pytest.raises(ValueError):
        TokenSigner("k" * (SECRET_KEY_MIN_BYTES - 1))
    TokenSigner("k" * SECRET_KEY_MIN_BYTES)
    key = "ñ" * (SECRET_KEY_MIN_BYTES // 2)  # 16 bytes in UTF-8, 8 characters
    assert load_settings(environ={"CLARA_SECRET_KEY": key}).secret_key == key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smtp_url = \n", "not valid TOML: Invalid value (at line 1, column 12)"),
        ('smtp_ur1 = "x"\n', "unknown setting 'smtp_ur1' (did you mean 'smtp_url'?)"),
        ('retry_in_run = "abc"\n', "retry_in_run must be seconds separated by commas"),
        ("retry_max = true\n", "retry_max must be a number"),
        ("base_url = 8025\n", "base_url must be text in quotes, not 8025"),
        ("x = 1\n[clara-mail]\nretry_max = 5\n", "setting 'x' is outside the [clara-mail] table"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / CONFIG_FILE).write_text(text)
    result = run("config")
    assert_one_line_error(result, f"{tmp_path / CONFIG_FILE}: {expected}")


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(b'base_url = "https://caf\xe9.example"\n')
    assert_one_line_error(run("config"), f"{tmp_path / CONFIG_FILE}: not UTF-8 text")


def test_a_bad_file_value_is_refused_even_when_the_environment_overrides_it(
    tmp_path: Path,
) -> None:
    (tmp_path / CONFIG_FILE).write_text('retry_in_run = "abc"\n')
    result = run("config", env={"CLARA_RETRY_IN_RUN": "1,2"})
    assert_one_line_error(result, f"{tmp_path / CONFIG_FILE}: retry_in_run")


def test_postgres_scheme_is_normalised_for_sqlalchemy() -> None:
    result = run("config", env={"CLARA_DATABASE_URL": "postgres://clara:s3cret@db.example/clara"})
    assert result.exit_code == 0, result.output
    assert "database_url = postgresql+psycopg://clara:***@db.example/clara" in result.stdout
    assert "s3cret" not in result.output
    assert normalise_database_url("postgres+psycopg2://db/x") == "postgresql+psycopg2://db/x"
    assert normalise_database_url("postgresql://db/x") == "postgresql://db/x"
    assert normalise_database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="database URL must start with sqlite"):
        normalise_database_url("clara.db")


# -- load_settings itself ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_in_the_file_is_checked(tmp_path: Path, name: str) -> None:
    """A boolean is no value of any setting: each one says so, naming the file."""
    (tmp_path / CONFIG_FILE).write_text(f"{name} = true\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, {})
    assert str(info.value).startswith(f"{tmp_path / CONFIG_FILE}: {name} must be ")
    assert "\n" not in str(info.value)


#: A bad text for each setting that can be given a bad text (any text is a valid domain,
#: selector or path: those are checked where they are used).
BAD_TEXT = {
    "sender_address": "boletin at oberaxe.example",
    "database_url": "clara.db",
    "smtp_url": "smtp://[",
    "base_url": "ftp://clara.example",
    "secret_key": "x",
    "bounce_address": "bounces at clara.example",
    "retry_in_run": "5;20",
    "privacy_url": "clara.example/privacy",
    "subscribe_segments": "Local Police",
    "consent_text_es": "x" * 2001,
    "consent_text_en": "x" * 2001,
    **{
        name: "-1"
        for name in SETTINGS
        if Settings.__dataclass_fields__[name].type in ("int", "float")
    },
}


def test_bad_text_covers_every_setting_but_text_and_paths() -> None:
    free = {"dkim_domain", "dkim_selector", "dkim_key_file", "outbox_dir", "templates_dir"}
    free |= {"dkim_ed25519_selector", "dkim_ed25519_key_file"}
    free |= {"sender_legal_name", "sender_postal_address", "controller_contact"}
    assert set(BAD_TEXT) == set(SETTINGS) - free


@pytest.mark.parametrize("name", sorted(BAD_TEXT))
def test_every_variable_is_checked(name: str) -> None:
    variable = f"CLARA_{name.upper()}"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={variable: BAD_TEXT[name]})
    assert str(info.value).startswith(f"{variable}: {name} ")
    assert "\n" not in str(info.value)


def test_values_are_parsed_at_load(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(
        "[clara-mail]\nretry_in_run = [1, 2.5]\nsmtp_timeout = 5\nretry_max = 60.0\n"
        'outbox-dir = "~/outbox"\n'
    )
    settings = load_settings(tmp_path, {"CLARA_CLAIM_BATCH": " 200 "})
    assert settings.retry_in_run == "1,2.5" and settings.retry_in_run_delays == (1.0, 2.5)
    assert settings.smtp_timeout == 5.0 and isinstance(settings.smtp_timeout, float)
    assert settings.retry_max == 60 and isinstance(settings.retry_max, int)
    assert settings.claim_batch == 200
    assert settings.outbox_dir == Path.home() / "outbox"
    spaced = load_settings(tmp_path, {"CLARA_RETRY_IN_RUN": " 5, 20 ,"})
    assert spaced.retry_in_run == "5,20" and spaced.retry_in_run_delays == (5.0, 20.0)
    (tmp_path / CONFIG_FILE).write_text("retry_in_run = []\n")
    assert load_settings(tmp_path, {}).retry_in_run_delays == ()


def test_an_empty_variable_means_not_set() -> None:
    settings = load_settings(environ={"CLARA_SMTP_URL": "", "CLARA_RETRY_MAX": " "})
    assert settings.smtp_url is None and settings.retry_max == Settings.retry_max


def test_dkim_settings_go_together(tmp_path: Path) -> None:
    key = tmp_path / "dkim.pem"
    with pytest.raises(ConfigError, match="needs dkim_selector and dkim_key_file too"):
        load_settings(environ={"CLARA_DKIM_DOMAIN": "clara.example"})
    env = {
        "CLARA_DKIM_DOMAIN": "clara.example",
        "CLARA_DKIM_SELECTOR": "s",
        "CLARA_DKIM_KEY_FILE": str(key),
    }
    assert load_settings(environ=env).dkim_key_file == key


def test_overrides_are_checked_too() -> None:
    assert load_settings(environ={}, retry_max=7).retry_max == 7
    with pytest.raises(ConfigError, match=r"load_settings\(retry_max=...\): retry_max must be"):
        load_settings(environ={}, retry_max=-7)


def test_mask_url_hides_passwords_even_in_malformed_urls() -> None:
    assert mask_url("smtp://clara:hunter2@relay.example:587") == (
        "smtp://clara:***@relay.example:587"
    )
    assert mask_url("smtp://u:pw@[::1:1") == "smtp://u:***@[::1:1"
    assert mask_url("postgresql://u:pa#ss/w@db/x") == "postgresql://u:***@db/x"
    assert mask_url("imap://user@mail.example:993") == "imap://user@mail.example:993"
    assert mask_url("smtp://relay.example:25?tls=none") == "smtp://relay.example:25?tls=none"
