"""Campaign definitions: ``templates/email/<slug>/campaign.toml`` plus its Jinja templates.

A campaign folder holds ``campaign.toml`` and one ``<language>.html.j2`` per language;
the shared layout and stylesheet live once in the templates folder itself. Loading checks
the definition (not the templates: ``render.check_campaign`` renders every variant).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clara_mailer.compose.markdown import apply_front_matter, body_file
from clara_mailer.core.errors import CampaignError, ConfigError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.core.vocabulary import CampaignKind, choices

CAMPAIGN_FILE = "campaign.toml"
#: The campaign's facts, beside campaign.toml; the facts every campaign shares, beside them.
DATA_FILE = "data.toml"
PROJECT_FILE = "project.toml"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
_ADDR = re.compile(r"^[^@\s<>\"(),;:\\\[\]]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
_LIST_ID = re.compile(r"^[A-Za-z0-9.-]+\.[A-Za-z0-9-]+$")


@dataclass(frozen=True)
class EventDef:
    """The event an invitation is about (times are aware, in ``timezone``)."""

    title: dict[str, str]
    start: dt.datetime
    end: dt.datetime
    timezone: str
    place: dict[str, str]  # the city, per language ("Madrid")
    venue_name: str  # empty until the user fills it in: the report names no venue
    venue_address: str
    organiser: str
    organiser_email: str
    sequence: int
    stamp: dt.datetime  # DTSTAMP: when this version of the event was published (UTC)


@dataclass(frozen=True)
class CampaignDef:
    slug: str
    kind: CampaignKind
    path: Path
    languages: tuple[str, ...]
    default_segments: tuple[str, ...]
    sender: str  # addr-spec
    sender_domain: str  # ASCII (IDNA) form
    sender_name: str
    reply_to: str
    unsubscribe_address: str  # mailbox of the List-Unsubscribe mailto: link
    list_id: str
    list_name: str
    subjects: dict[str, str] = field(hash=False)
    preheaders: dict[str, str] = field(hash=False)
    event: EventDef | None = None
    #: The From display name per language (``[languages.xx] sender_name``), else sender_name.
    sender_names: dict[str, str] = field(default_factory=dict, hash=False)
    #: The campaign's facts (``data.toml`` beside campaign.toml), for the templates' loops.
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: Facts shared by every campaign (``project.toml`` in the templates folder).
    project: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def template_file(self, language: str) -> Path:
        """``<language>.html.j2``, or the Markdown body ``body.<language>.md`` given instead."""
        markdown = body_file(self.path, language)
        html = self.path / f"{language}.html.j2"
        return markdown if markdown.is_file() and not html.is_file() else html

    @property
    def toml_path(self) -> Path:
        return self.path / CAMPAIGN_FILE

    def display_name(self, language: str) -> str:
        """The From display name in ``language``."""
        return self.sender_names.get(language, self.sender_name)

    def location(self, language: str) -> str:
        """Where the event is, as far as the settings say: venue and address, else the city."""
        ev = self.event
        if ev is None:
            return ""
        parts = [p for p in (ev.venue_name, ev.venue_address) if p]
        return ", ".join([*parts, ev.place[language]] if parts else [ev.place[language]])


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError) -> CampaignError:
    # tomllib says "... (at line L, column C)": turn that into path:line:column.
    text = str(exc)
    match = re.search(r"\(at line (\d+), column (\d+)\)$", text)
    if match:
        reason = text[: match.start()].strip()
        return CampaignError(f"{path}:{match.group(1)}:{match.group(2)}: {reason}")
    return CampaignError(f"{path}: {text}")


class _Reader:
    """Typed access to the TOML table, with errors naming the file and the key."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def fail(self, key: str, why: str) -> CampaignError:
        return CampaignError(f"{self.path}: {key}: {why}")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is ...:
                    raise self.fail(key, "missing")
                return default
            node = node[part]
        if not isinstance(node, kind):
            raise self.fail(key, f"must be a {kind.__name__}, not {type(node).__name__}")
        return node

    def text(self, key: str, default: Any = ...) -> Any:  # str, or the default
        value = self.get(key, str, default)
        if isinstance(value, str) and ("\r" in value or "\n" in value):
            raise self.fail(key, "must be one line")
        return value

    def address(self, key: str, default: Any = ...) -> str:
        value = str(self.text(key, default))
        if not _ADDR.match(value):
            raise self.fail(key, f"{value!r} is not a plain ASCII address")
        return value

    def per_language(self, key: str, languages: tuple[str, ...]) -> dict[str, str]:
        out = {}
        for lang in languages:
            value = self.text(f"languages.{lang}.{key}", None)
            if value is not None:
                out[lang] = value
        return out


def _read_data(path: Path) -> dict[str, Any]:
    """A facts file as a dict (empty when there is none), errors naming file and line."""
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, exc) from None
    except UnicodeDecodeError:
        raise CampaignError(f"{path}: not UTF-8 text") from None


def _read_event(r: _Reader, languages: tuple[str, ...]) -> EventDef:
    tzname = r.text("event.timezone")
    try:
        tz = ZoneInfo(tzname)
    except (ZoneInfoNotFoundError, ValueError):
        raise r.fail("event.timezone", f"unknown time zone {tzname!r}") from None
    start = r.get("event.start", dt.datetime)
    end = r.get("event.end", dt.datetime)
    if start.tzinfo is not None or end.tzinfo is not None:
        raise r.fail("event.start", "write local times without an offset; set event.timezone")
    start, end = start.replace(tzinfo=tz), end.replace(tzinfo=tz)
    if end <= start:
        raise r.fail("event.end", "must be after event.start")
    stamp = r.get("event.updated", dt.datetime)
    stamp = stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp.astimezone(dt.UTC)
    titles = r.per_language("event_title", languages)
    places = r.per_language("event_place", languages)
    for lang in languages:
        if lang not in titles:
            raise r.fail(f"languages.{lang}.event_title", "missing")
        if lang not in places:
            raise r.fail(f"languages.{lang}.event_place", "missing")
    return EventDef(
        title=titles,
        start=start,
        end=end,
        timezone=tzname,
        place=places,
        venue_name=r.text("event.venue_name", ""),
        venue_address=r.text("event.venue_address", ""),
        organiser=r.text("event.organiser"),
        organiser_email=r.address("event.organiser_email"),
        sequence=r.get("event.sequence", int, 0),
        stamp=stamp,
    )


def campaign_dir(settings: Settings, slug: str) -> Path:
    if not _SLUG.match(slug):
        raise NotFound(f"no campaign {slug!r}: a campaign name is lowercase letters, digits, -")
    return Path(settings.templates_dir) / slug


def load_campaign(settings: Settings, slug: str) -> CampaignDef:
    """Read and validate ``templates/email/<slug>/campaign.toml``, with the settings that
    apply to every campaign (``sender_address``)."""
    path = campaign_dir(settings, slug)
    toml_path = path / CAMPAIGN_FILE
    if not toml_path.is_file():
        known = ", ".join(_campaign_slugs(settings)) or "none"
        raise NotFound(f"no campaign {slug!r} in {settings.templates_dir} (defined: {known})")
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(toml_path, exc) from None
    except UnicodeDecodeError:
        raise CampaignError(f"{toml_path}: not UTF-8 text") from None
    r = _Reader(toml_path, data)

    kind = r.text("kind")
    if kind not in set(CampaignKind):
        raise r.fail("kind", f"must be one of {choices(CampaignKind)}, not {kind!r}")
    langs_table = r.get("languages", dict)
    languages = tuple(lang for lang in langs_table if isinstance(langs_table[lang], dict))
    if not languages:
        raise r.fail("languages", "define at least one [languages.<code>] table")
    segments = r.get("default_segments", list, [])
    if not all(isinstance(s, str) and s for s in segments):
        raise r.fail("default_segments", "must be a list of segment names")
    # The sender_address setting, when set, replaces every campaign's [sender] address
    # (and with it the domain of Message-IDs and the defaults derived from it).
    sender = r.address("sender.address")
    if settings.sender_address:
        sender = settings.sender_address
        if not (sender.isascii() and _ADDR.match(sender)):
            raise ConfigError(f"sender_address: {sender!r} is not a plain ASCII address")
    subjects = r.per_language("subject", languages)
    preheaders = r.per_language("preheader", languages)
    # Markdown bodies (body.<language>.md) may give them in their front matter instead.
    apply_front_matter(path, languages, subjects, preheaders, toml_path)
    event = _read_event(r, languages) if kind == CampaignKind.INVITATION else None
    domain = sender.rpartition("@")[2].lower()
    list_id = r.text("list_id", f"{kind}.{domain}")
    if not _LIST_ID.match(list_id):
        raise r.fail("list_id", f"{list_id!r} is not a list id such as newsletter.clara.example")
    return CampaignDef(
        sender_names=r.per_language("sender_name", languages),
        data=_read_data(path / DATA_FILE),
        project=_read_data(path.parent / PROJECT_FILE),
        slug=slug,
        kind=CampaignKind(kind),
        path=path,
        languages=languages,
        default_segments=tuple(segments),
        sender=sender,
        sender_domain=domain,
        sender_name=r.text("sender.name", ""),
        reply_to=r.address("sender.reply_to", sender),
        unsubscribe_address=r.address("sender.unsubscribe", f"unsubscribe@{domain}"),
        list_id=list_id,
        list_name=r.text("list_name", f"CLARA {kind}"),
        subjects=subjects,
        preheaders=preheaders,
        event=event,
    )


def _campaign_slugs(settings: Settings) -> list[str]:
    root = Path(settings.templates_dir)
    if not root.is_dir():
        return []
    return [
        d.name
        for d in sorted(root.iterdir())
        if d.is_dir() and (d / CAMPAIGN_FILE).is_file() and _SLUG.match(d.name)
    ]


def list_campaigns(settings: Settings) -> list[CampaignDef]:
    """Every campaign defined in the templates folder, by slug."""
    return [load_campaign(settings, slug) for slug in _campaign_slugs(settings)]


def campaign_rows(settings: Settings) -> list[dict[str, Any]]:
    """What ``clara-mail campaigns`` lists: one dict per campaign (extendable with figures)."""
    return [
        {
            "slug": d.slug,
            "kind": d.kind,
            "languages": ", ".join(d.languages),
            "default_segments": ", ".join(d.default_segments),
            "subject": d.subjects.get(d.languages[0], ""),
        }
        for d in list_campaigns(settings)
    ]


def template_hash(defn: CampaignDef) -> str:
    """sha256 over the campaign's files and the shared files (layout, stylesheet)."""
    digest = hashlib.sha256()
    shared = [p for p in sorted(defn.path.parent.iterdir()) if p.is_file()]
    own = [p for p in sorted(defn.path.rglob("*")) if p.is_file()]
    for p in shared + own:
        digest.update(p.relative_to(defn.path.parent).as_posix().encode() + b"\0")
        data = p.read_bytes()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()
