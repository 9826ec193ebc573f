"""Settings: defaults, then ``clara-mail.toml`` in the working directory, then ``CLARA_*``.

The environment wins over the file so that CI and deployments can override one value
without editing the file. Every setting has a name usable in both places: ``smtp_url``
in the file is ``CLARA_SMTP_URL`` in the environment.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from clara_mailer.core.errors import ConfigError
from clara_mailer.core.resources import EMAIL_TEMPLATES

CONFIG_FILE = "clara-mail.toml"


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
    retry_in_run: str = "5,20"
    claim_batch: int = 500

    @property
    def retry_in_run_delays(self) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in self.retry_in_run.split(",") if x.strip())
        except ValueError:
            raise ConfigError(
                f"retry_in_run must be seconds separated by commas, not {self.retry_in_run!r}"
            ) from None

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


def mask_url(url: str) -> str:
    """Hide the password of a URL such as ``smtp://user:pass@host:587``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _coerce(name: str, kind: Any, raw: Any, where: str) -> Any:
    text = str(raw).strip() if not isinstance(raw, bool | int | float) else raw
    if text == "":
        return None
    try:
        if kind in (int, "int"):
            return int(text)
        if kind in (float, "float"):
            return float(text)
        if "Path" in str(kind):
            return Path(str(text)).expanduser()
    except ValueError:
        raise ConfigError(f"{where}: {name} must be a number, not {raw!r}") from None
    return str(text)


def load_settings(
    directory: Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read the settings that apply in ``directory`` (default: the working directory)."""
    directory = Path.cwd() if directory is None else directory
    environ = os.environ if environ is None else environ
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = directory / CONFIG_FILE
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data = data.get("clara-mail", data)
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = _coerce(name, known[name].type, raw, str(path))

    for name, f in known.items():
        env_name = f"CLARA_{name.upper()}"
        if env_name in environ:
            values[name] = _coerce(name, f.type, environ[env_name], env_name)

    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: v for k, v in values.items() if v is not None or known[k].default is None}
    settings = Settings(**values)
    if not settings.base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"base_url must start with http:// or https://, not {settings.base_url!r}"
        )
    return settings
