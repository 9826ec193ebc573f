"""Settings: defaults, then ``clara-mail.toml`` in the working directory, then ``CLARA_*``.

The environment wins over the file so that CI and deployments can override one value
without editing the file. Every setting has a name usable in both places: ``smtp_url``
in the file is ``CLARA_SMTP_URL`` in the environment (an empty variable means "not set").
The file may hold the settings at its top level or in a ``[clara-mail]`` table.

Every value is checked when the settings are loaded, from whichever source it came: a bad
one is a ``ConfigError`` (exit 2) of one line that names the source and the setting, e.g.
``CLARA_RETRY_IN_RUN: retry_in_run must be seconds separated by commas, not 'abc'``. So a
``Settings`` from ``load_settings`` holds only values the rest of the library can use.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from clara_mailer.core.errors import ConfigError
from clara_mailer.core.resources import EMAIL_TEMPLATES

CONFIG_FILE = "clara-mail.toml"
#: Names the project folder (the one holding clara-mail.toml), as ``--project`` does.
PROJECT_VARIABLE = "CLARA_PROJECT"
#: A project's campaigns folder: ``templates_dir`` when the file names none.
PROJECT_CAMPAIGNS = "campaigns"
#: Settings that name a file or folder: relative in clara-mail.toml, they are in the project.
_PROJECT_PATHS = ("outbox_dir", "templates_dir", "dkim_key_file", "dkim_ed25519_key_file")
#: What ``core.tokens.TokenSigner`` needs of a configured secret key (UTF-8 bytes).
SECRET_KEY_MIN_BYTES = 16
#: Longest wait or lifetime a setting may name: far beyond any use, short of overflowing
#: a date (a typo such as an extra six zeroes is refused here, not in the middle of a send).
_MAX_SECONDS = 10 * 365 * 24 * 3600
_MAX_COUNT = 10**9


def _default_templates_dir() -> Path:
    here = Path.cwd() / "templates" / "email"
    return here if here.is_dir() else EMAIL_TEMPLATES


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///clara-mail.db"
    smtp_url: str | None = None
    base_url: str = "http://127.0.0.1:8025"
    secret_key: str | None = None
    outbox_dir: Path = Path("outbox")
    templates_dir: Path = dataclasses.field(default_factory=_default_templates_dir)
    bounce_address: str | None = None
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_key_file: Path | None = None
    # A second signature, Ed25519 (RFC 8463), beside the RSA one: needs the three above.
    dkim_ed25519_selector: str | None = None
    dkim_ed25519_key_file: Path | None = None
    smtp_timeout: float = 60.0
    smtp_data_timeout: float = 600.0
    reconnect_after: int = 1000
    retry_initial: int = 300
    retry_max: int = 3600
    retry_expire: int = 3 * 24 * 3600
    soft_bounce_limit: int = 3
    soft_bounce_window_days: int = 30
    lease_seconds: int = 120
    # Delays (seconds) of the short retries made within one run before a deferred
    # message is left for the next `send` on the long schedule (retry_initial doubling).
    # Text such as "5,20" (checked and written so by load_settings); "" for none.
    retry_in_run: str = "5,20"
    claim_batch: int = 500
    # The legal footer of every message: who sends, where, whom to ask.
    sender_legal_name: str | None = None
    sender_postal_address: str | None = None
    controller_contact: str | None = None
    privacy_url: str | None = None
    # The From address of every campaign, replacing each campaign.toml's [sender] address.
    sender_address: str | None = None
    # The subscribe form (``/subscribe``): the segments it offers (slugs separated by
    # commas; none: no form), the consent text shown in each language (none: the built-in
    # one) and how long a confirmation link stays valid.
    subscribe_segments: str | None = None
    consent_text_es: str | None = None
    consent_text_en: str | None = None
    confirm_hours: int = 48

    @property
    def retry_in_run_delays(self) -> tuple[float, ...]:
        try:
            return _delays(self.retry_in_run)
        except _Invalid as exc:
            raise ConfigError(f"retry_in_run {exc}") from None

    def masked(self) -> dict[str, str]:
        """Every setting as text, with passwords and keys hidden."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = "(not set)"
            elif f.name == "secret_key":
                text = "********"
            elif f.name.endswith("_url"):
                text = mask_url(str(value))
            else:
                text = str(value)
            out[f.name] = text
        return out


# ``scheme://user:password@``: the password runs to the last "@" (database drivers allow
# unencoded "#", "/" or "?" in it), so a URL too malformed to parse is still masked.
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):.*@")


def mask_url(url: str) -> str:
    """Hide the password of a URL such as ``smtp://user:pass@host:587``."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", url, count=1)


# --- checking one value ------------------------------------------------------------------


class _Invalid(Exception):
    """Why a value is refused, worded to follow the setting's name ("must be ...")."""


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise _Invalid(f"must be text in quotes, not {raw!r}")
    return raw.strip()


def _path(raw: object) -> Path:
    return Path(_text(raw)).expanduser()


def _number(
    kind: type[int] | type[float], what: str, low: int, high: int, *, above: bool = False
) -> Callable[[object], int | float]:
    """A parser of a number of ``what`` from ``low`` (or above it, ``above``) to ``high``."""
    bounds = f"above {low} and at most {high}" if above else f"from {low} to {high}"

    def parse(raw: object) -> int | float:
        value: int | float
        try:
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError
            value = float(raw)
            if kind is int:
                if not value.is_integer():
                    raise ValueError
                value = int(raw) if isinstance(raw, int) else int(value)
            if not (low < value if above else low <= value) or not value <= high:
                raise ValueError
        except (ValueError, OverflowError):
            raise _Invalid(f"must be a number ({what} {bounds}), not {raw!r}") from None
        return value

    return parse


def _delays(raw: object) -> tuple[float, ...]:
    """``"5,20"`` (or a TOML list ``[5, 20]``) -> ``(5.0, 20.0)``; ``""`` -> none."""
    try:
        if isinstance(raw, str):
            items: list[object] = list(raw.split(","))
        elif isinstance(raw, list):
            items = raw
        else:
            raise ValueError
        delays = []
        for item in items:
            if isinstance(item, str) and not item.strip():
                continue
            if isinstance(item, bool) or not isinstance(item, int | float | str):
                raise ValueError
            delay = float(item)
            if not (math.isfinite(delay) and 0 <= delay <= _MAX_SECONDS):
                raise ValueError
            delays.append(delay)
    except ValueError:
        raise _Invalid(f"must be seconds separated by commas, not {raw!r}") from None
    return tuple(delays)


def _retry_in_run(raw: object) -> str:
    return ",".join(f"{delay:g}" for delay in _delays(raw))


def _normalise_database_url(url: str) -> str:
    """``postgres://`` (Heroku, libpq) -> ``postgresql+psycopg://``: SQLAlchemy knows only
    ``postgresql``, and psycopg 3 is the driver ``clara-mail[postgres]`` installs."""
    scheme, sep, rest = url.partition("://")
    backend, _, driver = scheme.partition("+")
    if sep and backend.lower() == "postgres":
        return f"postgresql+{driver or 'psycopg'}://{rest}"
    return url


def _database_url(raw: object) -> str:
    url = _normalise_database_url(_text(raw))
    scheme, sep, _ = url.partition("://")
    backend = scheme.partition("+")[0].lower()
    if not sep or backend not in ("sqlite", "postgresql"):
        raise _Invalid(
            "must start with sqlite:/// (a file) or postgresql+psycopg:// (a server), "
            f"not {mask_url(url)!r}"
        )
    # The rest is SQLAlchemy's to parse (it allows passwords urlsplit would not); a
    # malformed one is refused in one line when the database is opened.
    return url


def _split_url(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise _Invalid(f"is not a valid URL ({exc}): {mask_url(url)!r}") from None
    return parts


def _smtp_url(raw: object) -> str:
    url = _text(raw)
    parts = _split_url(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise _Invalid(f"must start with smtp:// or smtps://, not {mask_url(url)!r}")
    if not parts.hostname:
        raise _Invalid(f"names no host: {mask_url(url)!r}")
    return url


def _web_url(raw: object) -> str:
    url = _text(raw)
    if not url.startswith(("http://", "https://")):
        raise _Invalid(f"must start with http:// or https://, not {mask_url(url)!r}")
    if not _split_url(url).hostname:
        raise _Invalid(f"names no host: {mask_url(url)!r}")
    return url


def _base_url(raw: object) -> str:
    url = _web_url(raw)
    if not url.isascii():
        # It goes into List-Unsubscribe headers, which must be ASCII.
        raise _Invalid(f"must be ASCII (the domain as IDNA, xn--...), not {mask_url(url)!r}")
    return url


def _secret_key(raw: object) -> str:
    if not isinstance(raw, str):
        raise _Invalid("must be text in quotes")
    size = len(raw.encode("utf-8"))
    if size < SECRET_KEY_MIN_BYTES:
        # The key itself is never shown, not even a short one.
        raise _Invalid(
            f"must be at least {SECRET_KEY_MIN_BYTES} bytes long (this one has {size}); "
            """make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"""
        )
    return raw


_SEGMENT_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
#: Longest consent text a setting may hold (it is stored, and shown on every form).
CONSENT_TEXT_MAX = 2000


def _segment_list(raw: object) -> str:
    """``"associations, city-networks"`` (or a TOML list) -> ``"associations,city-networks"``."""
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [str(item).strip() for item in raw]
    elif isinstance(raw, str):
        items = [item.strip() for item in raw.split(",")]
    else:
        raise _Invalid(f"must be segment names separated by commas, not {raw!r}")
    items = [item for item in items if item]
    for item in items:
        if not _SEGMENT_SLUG.match(item):
            raise _Invalid(
                f"must be segment names (lowercase letters, digits and -) separated by "
                f"commas: {item!r} is not one"
            )
    return ",".join(dict.fromkeys(items))


def _consent_text(raw: object) -> str:
    text = _text(raw)
    if len(text) > CONSENT_TEXT_MAX:
        raise _Invalid(f"must be at most {CONSENT_TEXT_MAX} characters (this one has {len(text)})")
    return text


def _address(raw: object) -> str:
    address = _text(raw)
    local, at, domain = address.rpartition("@")
    if not (at and local and "." in domain) or re.search(r"[\s<>,;]", address):
        raise _Invalid(f"must be an address such as bounces@clara.example, not {address!r}")
    return address


_PARSERS: dict[str, Callable[[object], Any]] = {
    "database_url": _database_url,
    "smtp_url": _smtp_url,
    "base_url": _base_url,
    "secret_key": _secret_key,
    "outbox_dir": _path,
    "templates_dir": _path,
    "bounce_address": _address,
    "dkim_domain": _text,
    "dkim_selector": _text,
    "dkim_key_file": _path,
    "dkim_ed25519_selector": _text,
    "dkim_ed25519_key_file": _path,
    "smtp_timeout": _number(float, "seconds", 0, _MAX_SECONDS, above=True),
    "smtp_data_timeout": _number(float, "seconds", 0, _MAX_SECONDS, above=True),
    "reconnect_after": _number(int, "messages", 1, _MAX_COUNT),
    "retry_initial": _number(int, "whole seconds", 0, _MAX_SECONDS),
    "retry_max": _number(int, "whole seconds", 0, _MAX_SECONDS),
    "retry_expire": _number(int, "whole seconds", 0, _MAX_SECONDS),
    "soft_bounce_limit": _number(int, "bounces", 1, _MAX_COUNT),
    "soft_bounce_window_days": _number(int, "whole days", 1, _MAX_SECONDS // 86400),
    "lease_seconds": _number(int, "whole seconds", 1, _MAX_SECONDS),
    "retry_in_run": _retry_in_run,
    "claim_batch": _number(int, "rows", 1, _MAX_COUNT),
    "sender_legal_name": _text,
    "sender_postal_address": _text,
    "controller_contact": _text,
    "privacy_url": _web_url,
    "sender_address": _address,
    "subscribe_segments": _segment_list,
    "consent_text_es": _consent_text,
    "consent_text_en": _consent_text,
    "confirm_hours": _number(int, "whole hours", 1, 24 * 90),
}
assert set(_PARSERS) == {f.name for f in fields(Settings)}, "every setting needs a parser"

_DKIM = ("dkim_domain", "dkim_selector", "dkim_key_file")
_DKIM_ED25519 = ("dkim_ed25519_selector", "dkim_ed25519_key_file")


def normalise_database_url(url: str) -> str:
    """A database URL as ``load_settings`` would keep it (``postgres://`` fixed), or a
    ``ConfigError`` naming what is wrong: for URLs given outside the settings (``db copy``)."""
    try:
        return _database_url(url)
    except _Invalid as exc:
        raise ConfigError(f"database URL {exc}") from None


# --- loading -----------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if "clara-mail" in data:
        table = data.pop("clara-mail")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [clara-mail] must be a table of settings")
        if data:
            raise ConfigError(
                f"{path}: setting {next(iter(data))!r} is outside the [clara-mail] table"
            )
        data = table
    return data


def _unknown(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown setting {key!r}{hint}"


def _check(name: str, raw: object, where: str) -> Any:
    """The value of setting ``name`` given as ``raw`` by ``where``; None when empty."""
    if isinstance(raw, str) and not raw.strip():
        return None
    try:
        return _PARSERS[name](raw)
    except _Invalid as exc:
        raise ConfigError(f"{where}: {name} {exc}") from None


def project_folder(path: Path, where: str) -> Path:
    """``path`` as a project folder (absolute), or a ConfigError naming ``where`` (the
    option or variable that gave it) when it holds no clara-mail.toml."""
    folder = path.expanduser().absolute()
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{where}: no {CONFIG_FILE} in {folder} (make a project there with: "
            f"clara-mail init {path})"
        )
    return folder


def find_project(
    start: Path | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The project folder, as git finds its repository: ``CLARA_PROJECT`` when set, else
    the nearest of ``start`` (the working directory) and its parents that holds
    clara-mail.toml; None when there is none (the defaults apply, in the working directory)."""
    environ = os.environ if environ is None else environ
    named = environ.get(PROJECT_VARIABLE, "").strip()
    if named:
        return project_folder(Path(named), PROJECT_VARIABLE)
    here = (Path.cwd() if start is None else start).absolute()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def _in_project(name: str, value: Any, folder: Path) -> Any:
    """A value read from the project's file, with a relative path made one in ``folder``."""
    if name in _PROJECT_PATHS and isinstance(value, Path) and not value.is_absolute():
        return folder.absolute() / value
    if name == "database_url" and isinstance(value, str):
        scheme, _, rest = value.partition("://")
        file, sep, query = rest[1:].partition("?") if rest.startswith("/") else ("", "", "")
        relative = file and file != ":memory:" and not file.startswith(("/", "file:"))
        if scheme.partition("+")[0].lower() == "sqlite" and relative:
            return f"{scheme}:///{folder.absolute() / file}{sep}{query}"
    return value


def load_settings(
    directory: Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read and check the settings of the project in ``directory`` (default: the one
    ``find_project`` finds, else the working directory). ``overrides`` (keyword arguments)
    win over both, and are checked too. Relative paths in the file (the SQLite database,
    ``outbox_dir``, ``templates_dir``, ``dkim_key_file``) are in the project folder, and a
    project's ``templates_dir`` is its ``campaigns/`` folder unless set otherwise."""
    environ = os.environ if environ is None else environ
    if directory is None:
        directory = find_project(environ=environ) or Path.cwd()
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def take(name: str, raw: object, where: str) -> None:
        values[name] = _check(name, raw, where)
        sources[name] = where

    path = directory / CONFIG_FILE
    if path.is_file():
        for key, raw in _read_file(path).items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{path}: {_unknown(key, known)}")
            take(name, raw, str(path))
            values[name] = _in_project(name, values[name], directory)
        campaigns = directory / PROJECT_CAMPAIGNS
        if values.get("templates_dir") is None and campaigns.is_dir():
            values["templates_dir"] = campaigns

    for name in known:
        env_name = f"CLARA_{name.upper()}"
        if env_name in environ:
            take(name, environ[env_name], env_name)

    for name, raw in overrides.items():
        if name not in known:
            raise TypeError(f"load_settings() got an unknown setting {name!r}")
        if raw is not None:
            take(name, str(raw) if isinstance(raw, Path) else raw, f"load_settings({name}=...)")

    _check_dkim(values, sources)

    # An empty value means "not set": the default, or None where None is the default.
    chosen = {k: v for k, v in values.items() if v is not None or known[k].default is None}
    return Settings(**chosen)


def _check_dkim(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """The DKIM settings go together: all three RSA ones or none, and the two Ed25519 ones
    (a second signature) both or neither, and only beside RSA under another selector."""
    for group, which in ((_DKIM, "dkim_"), (_DKIM_ED25519, "dkim_ed25519_")):
        given = [name for name in group if values.get(name) is not None]
        if given and len(given) < len(group):
            missing = " and ".join(name for name in group if name not in given)
            raise ConfigError(
                f"{sources[given[0]]}: {given[0]} is set, so DKIM needs {missing} too "
                f"(or none of the {which} settings)"
            )
    ed25519 = values.get("dkim_ed25519_selector")
    if ed25519 is not None and values.get("dkim_domain") is None:
        raise ConfigError(
            f"{sources['dkim_ed25519_selector']}: dkim_ed25519_selector is set, so DKIM needs "
            "dkim_domain, dkim_selector and dkim_key_file too (Ed25519 signs beside RSA)"
        )
    if ed25519 is not None and ed25519 == values.get("dkim_selector"):
        raise ConfigError(
            f"{sources['dkim_ed25519_selector']}: dkim_ed25519_selector must differ from "
            "dkim_selector (each key has its own DNS record)"
        )
