"""Project commands: ``init`` (a project folder of the user's own) and ``new`` (a campaign).

A project folder holds ``clara-mail.toml`` (every setting, commented), ``campaigns/``
(the shared layout, stylesheet and project facts, and the shipped campaigns as examples),
``recipients/`` (template CSV files) and a ``.gitignore`` for the database and the outbox.
Every command finds it as git finds a repository: clara-mail.toml in the working directory
or a parent, else ``--project DIR`` / ``CLARA_PROJECT``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import click

from clara_mailer.cli.app import App, main, pass_app
from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import CONFIG_FILE, PROJECT_CAMPAIGNS, Settings
from clara_mailer.core.vocabulary import CampaignKind

#: A new campaign's name: it is a folder name, a URL part and what users type.
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
RECIPIENTS = "recipients"

# -- clara-mail.toml ----------------------------------------------------------------------

#: (heading, [(setting, comment, value written uncommented or None for the default)])
_SECTIONS: list[tuple[str, list[tuple[str, str, str | None]]]] = [
    (
        "Where things are (relative paths are in this folder)",
        [
            (
                "database_url",
                "The database: a SQLite file here, or postgresql+psycopg://user@host/db",
                '"sqlite:///clara-mail.db"',
            ),
            ("outbox_dir", "Without smtp_url, messages are written here as .eml files", '"outbox"'),
            (
                "templates_dir",
                "The campaigns: one folder each, and the shared layout",
                '"campaigns"',
            ),
        ],
    ),
    (
        "The legal footer of every message: fill these in before a real send\n"
        "# (sending over SMTP is refused while one is empty)",
        [
            (
                "sender_legal_name",
                'Who sends and controls the data, e.g. "Asociación Ejemplo"',
                '""',
            ),
            ("sender_postal_address", 'e.g. "Calle Mayor 1, 28001 Madrid, España"', '""'),
            (
                "controller_contact",
                'Whom to ask about the data, e.g. "privacidad@ejemplo.example"',
                '""',
            ),
            ("privacy_url", 'The privacy notice, e.g. "https://ejemplo.example/privacidad"', '""'),
            (
                "sender_address",
                "The From address of every campaign (replaces each campaign.toml's)",
                '""',
            ),
        ],
    ),
    (
        "Sending",
        [
            (
                "smtp_url",
                'The mail server, e.g. "smtp://user:password@relay.example:587"; not set: the outbox',
                None,
            ),
            (
                "base_url",
                "Where `clara-mail serve` (unsubscribe and RSVP pages) is reachable",
                None,
            ),
            (
                "secret_key",
                "Signs the links; generated on first use and kept in the database",
                None,
            ),
            (
                "bounce_address",
                'VERP return path for bounces, e.g. "bounces@ejemplo.example"',
                None,
            ),
            ("dkim_domain", "DKIM signing (all three, or none: a relay usually signs)", None),
            ("dkim_selector", "", None),
            ("dkim_key_file", "", None),
            (
                "dkim_ed25519_selector",
                "A second, Ed25519 signature (RFC 8463): both, beside the three above",
                None,
            ),
            ("dkim_ed25519_key_file", "", None),
        ],
    ),
]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def settings_file_text() -> str:
    """The commented clara-mail.toml ``init`` writes: every setting, in sections."""
    defaults = Settings(templates_dir=Path(PROJECT_CAMPAIGNS))
    out = [
        "# clara-mail settings of this project. Every setting is listed; a line that starts",
        "# with '#' keeps the default. CLARA_<SETTING> environment variables win over this",
        "# file (CLARA_SMTP_URL for smtp_url). `clara-mail config` shows what applies.",
    ]
    done: set[str] = set()
    for heading, items in _SECTIONS:
        out += ["", f"# -- {heading}"]
        for name, comment, value in items:
            if not hasattr(defaults, name):
                continue
            done.add(name)
            if comment:
                out.append(f"# {comment}")
            if value is not None:
                out.append(f"{name} = {value}")
            else:
                default = getattr(defaults, name)
                shown = "(not set)" if default is None else _toml_value(default)
                out.append(f"# {name} = {shown}")
    rest = [f for f in dataclasses.fields(Settings) if f.name not in done]
    if rest:
        out += ["", "# -- Tuning (the defaults suit most sends)"]
        for f in rest:
            default = getattr(defaults, f.name)
            shown = "(not set)" if default is None else _toml_value(default)
            out.append(f"# {f.name} = {shown}")
    return "\n".join(out) + "\n"


_GITIGNORE = """\
# clara-mail: the database (recipients, deliveries) and the messages written to the outbox
# are data about people: keep them out of version control.
*.db
*.db-wal
*.db-shm
/outbox/
*.rejects.csv
"""

_RECIPIENTS_README = """\
# Recipients

Put your lists here as CSV (comma, semicolon or tab separated; UTF-8 or Windows-1252, as
spreadsheets export them) and import them with

    clara-mail import recipients/*.csv

`plantilla.csv` has the columns with Spanish headers, `template.csv` the same with English
ones: copy one, fill one row per address, and delete the templates you do not use (a file
with only its header imports nothing). Columns:

| Spanish | English | what |
|---|---|---|
| Correo electrónico | Email | the address (required) |
| Nombre | Name | a person or department (optional) |
| Organización | Organisation | (optional) |
| Segmento | Segment | e.g. local-police; several as a;b |
| Idioma | Language | es or en |
| País | Country | e.g. ES |
| Base jurídica | Consent basis | e.g. interés legítimo / legitimate interest |
| Origen | Source | where the address comes from: printed in every message's footer |

One address at a time: `clara-mail recipients add ana@ejemplo.example --name "Ana" --segment
local-police --language es`.
"""

_TEMPLATE_CSV = {
    "plantilla.csv": "Correo electrónico,Nombre,Organización,Segmento,Idioma,País,"
    "Base jurídica,Origen\n",
    "template.csv": "Email,Name,Organisation,Segment,Language,Country,Consent basis,Source\n",
}


def _project_files(folder: Path) -> dict[Path, str]:
    files = {
        folder / CONFIG_FILE: settings_file_text(),
        folder / ".gitignore": _GITIGNORE,
        folder / RECIPIENTS / "README.md": _RECIPIENTS_README,
    }
    for name, header in _TEMPLATE_CSV.items():
        files[folder / RECIPIENTS / name] = header
    return files


def _shipped_campaigns() -> list[Path]:
    return sorted(p for p in EMAIL_TEMPLATES.iterdir() if p.name != "__pycache__")


def init_project(folder: Path) -> list[Path]:
    """Make a project in ``folder`` (created if need be); the paths written. Writes
    nothing (InputError) where clara-mail.toml or any file it would write exists."""
    folder = folder.expanduser().absolute()
    if (folder / CONFIG_FILE).exists():
        raise InputError(f"{folder / CONFIG_FILE} exists: {folder} is a project already")
    files = _project_files(folder)
    campaigns = folder / PROJECT_CAMPAIGNS
    copies = {campaigns / p.name: p for p in _shipped_campaigns()}
    clash = [p for p in [*files, *copies] if p.exists()]
    if clash:
        raise InputError(f"{clash[0]} exists: init writes nothing over a file of yours")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    campaigns.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for target, source in copies.items():
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    return [*files, *copies]


@main.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
def init_cmd(directory: Path) -> None:
    """Make DIRECTORY (default: here) a clara-mail project folder.

    Writes clara-mail.toml (every setting, commented: fill in the legal footer),
    campaigns/ (the shared layout and the shipped campaigns as examples),
    recipients/ (template CSV files with Spanish and English headers) and a
    .gitignore for the database and the outbox. Refuses a folder that has a
    clara-mail.toml, and never writes over a file.

    Example: clara-mail init boletines && cd boletines && clara-mail new spring-2022 --kind newsletter
    """
    written = init_project(directory)
    folder = directory.expanduser().absolute()
    click.echo(f"Created a clara-mail project in {folder} ({len(written)} files and folders).")
    click.echo(f"  1. Fill in the legal footer in {folder / CONFIG_FILE}")
    click.echo(
        f"  2. Add recipients to {folder / RECIPIENTS}/ and run: clara-mail import recipients/*.csv"
    )
    click.echo("  3. Write a campaign: clara-mail new my-first-campaign --kind newsletter")


# -- new campaign ---------------------------------------------------------------------------

_BODIES: dict[str, dict[str, str]] = {
    "newsletter": {
        "es": """\
---
subject = "Boletín: escriba aquí el asunto"
preheader = "Una frase que resume el boletín (se ve junto al asunto)"
---
# Boletín del proyecto {{ project.acronym }}

{% if name %}Hola, {{ name }}:{% else %}Hola:{% endif %}

Escriba aquí el primer párrafo. **Negrita**, *cursiva* y [enlaces](https://proyectoclara.es/).

## Un apartado

- Un punto
- Otro punto

[[Un botón que enlaza]](https://proyectoclara.es/)
""",
        "en": """\
---
subject = "Newsletter: write the subject here"
preheader = "One sentence that sums the newsletter up (shown beside the subject)"
---
# The {{ project.acronym }} project newsletter

{% if name %}Dear {{ name }},{% else %}Dear colleagues,{% endif %}

Write the first paragraph here. **Bold**, *italics* and [links](https://proyectoclara.es/).

## A section

- One point
- Another point

[[A button that links]](https://proyectoclara.es/)
""",
    },
    "announcement": {
        "es": """\
---
subject = "Anuncio: escriba aquí el asunto"
preheader = "Una frase que resume el anuncio"
---
# Escriba aquí el titular

{% if name %}Hola, {{ name }}:{% else %}Hola:{% endif %}

Escriba aquí el anuncio.

[[Más información]](https://proyectoclara.es/)
""",
        "en": """\
---
subject = "Announcement: write the subject here"
preheader = "One sentence that sums the announcement up"
---
# Write the headline here

{% if name %}Dear {{ name }},{% else %}Dear colleagues,{% endif %}

Write the announcement here.

[[More information]](https://proyectoclara.es/)
""",
    },
    "invitation": {
        "es": """\
---
subject = "Invitación: escriba aquí el asunto"
preheader = "Una frase sobre el acto: qué, cuándo y dónde"
---
# Invitación

{% if name %}Hola, {{ name }}:{% else %}Hola:{% endif %}

Le invitamos a **{{ event.title }}**, el {{ event.date }}, de {{ event.start }} a {{ event.end }}, en {{ event.location }}.

¿Podrá asistir?

[[Sí, asistiré]]({{ rsvp_yes_url }})

[[No podré asistir]]({{ rsvp_no_url }})
""",
        "en": """\
---
subject = "Invitation: write the subject here"
preheader = "One sentence about the event: what, when and where"
---
# Invitation

{% if name %}Dear {{ name }},{% else %}Dear colleagues,{% endif %}

You are invited to **{{ event.title }}** on {{ event.date }}, from {{ event.start }} to {{ event.end }}, in {{ event.location }}.

Will you attend?

[[Yes, I will attend]]({{ rsvp_yes_url }})

[[No, I cannot attend]]({{ rsvp_no_url }})
""",
    },
}

_EVENT = """
# The event: local times in `timezone`; raise `sequence` and `updated` on every change.
[event]
timezone = "Europe/Madrid"
start = {day}T10:00:00
end = {day}T12:00:00
updated = {updated}
sequence = 0
venue_name = ""
venue_address = ""
organiser = {organiser}
organiser_email = {organiser_email}
"""


def _example_campaign(templates: Path, kind: str) -> dict[str, Any]:
    """campaign.toml of the campaign a new one takes its sender and segments from: the
    last (by name) of the same kind, else of any kind; empty when there is none."""
    found: list[tuple[bool, str, dict[str, Any]]] = []
    for toml in sorted(templates.glob("*/campaign.toml")):
        try:
            data = tomllib.loads(toml.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        found.append((data.get("kind") == kind, toml.parent.name, data))
    return max(found, key=lambda item: item[:2])[2] if found else {}


def campaign_toml(kind: str, example: dict[str, Any], settings: Settings) -> str:
    """A new campaign's campaign.toml: the subjects are in its Markdown bodies."""
    sender = example.get("sender") if isinstance(example.get("sender"), dict) else {}
    assert isinstance(sender, dict)
    address = settings.sender_address or sender.get("address") or "boletin@ejemplo.example"
    segments = example.get("default_segments", [])
    if not isinstance(segments, list):
        segments = []
    languages = example.get("languages") if isinstance(example.get("languages"), dict) else {}
    assert isinstance(languages, dict)
    q = _toml_value
    lines = [
        f"kind = {q(kind)}",
        "# Sent to these segments unless `clara-mail send --segment` says otherwise.",
        f"default_segments = [{', '.join(q(s) for s in segments)}]",
        "",
        "[sender]",
        f"name = {q(sender.get('name', ''))}",
        f"address = {q(address)}",
        "",
    ]
    for language in ("es", "en"):
        table = languages.get(language) if isinstance(languages.get(language), dict) else {}
        assert isinstance(table, dict)
        lines.append(f"# The subject and preheader are in body.{language}.md (front matter).")
        lines.append(f"[languages.{language}]")
        if table.get("sender_name"):
            lines.append(f"sender_name = {q(table['sender_name'])}")
        if kind == CampaignKind.INVITATION:
            title = (
                "Escriba aquí el título del acto" if language == "es" else "Write the title here"
            )
            lines.append(f"event_title = {q(title)}")
            lines.append(f"event_place = {q('Madrid')}")
        lines.append("")
    if kind == CampaignKind.INVITATION:
        import datetime as dt

        now = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
        stamp = now.isoformat() + "Z"
        lines.append(
            _EVENT.format(
                day=(now + dt.timedelta(days=30)).date().isoformat(),
                updated=stamp,
                organiser=q(sender.get("name", "") or "CLARA"),
                organiser_email=q(address),
            ).strip()
        )
    return "\n".join(lines).rstrip() + "\n"


def new_campaign(
    settings: Settings, slug: str, kind: str | None, from_slug: str | None
) -> list[Path]:
    """Write a campaign folder ``slug``; the files to open, bodies first."""
    if not SLUG.match(slug):
        raise InputError(
            f"{slug!r} is not a campaign name: lowercase letters, digits and -, starting with "
            "a letter or digit, at most 64 characters (e.g. spring-2022)"
        )
    templates = Path(settings.templates_dir)
    target = templates / slug
    if target.exists():
        raise InputError(f"{target} exists: choose another name (nothing was written)")
    if from_slug is not None:
        source = templates / from_slug
        if not SLUG.match(from_slug) or not (source / "campaign.toml").is_file():
            raise NotFound(f"no campaign {from_slug!r} in {templates} to copy")
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        toml = target / "campaign.toml"
        if kind is not None:
            text = toml.read_text(encoding="utf-8")
            toml.write_text(
                re.sub(r'(?m)^kind\s*=\s*"[^"]*"', f"kind = {_toml_value(kind)}", text, count=1),
                encoding="utf-8",
            )
        bodies = sorted(target.glob("body.*.md")) or sorted(target.glob("*.html.j2"))
        return [*bodies, toml]
    if kind is None:
        raise InputError("say which --kind (newsletter, invitation, announcement), or --from")
    target.mkdir(parents=True)
    toml = target / "campaign.toml"
    toml.write_text(
        campaign_toml(kind, _example_campaign(templates, kind), settings), encoding="utf-8"
    )
    bodies = []
    for language, text in _BODIES[kind].items():
        body = target / f"body.{language}.md"
        body.write_text(text, encoding="utf-8")
        bodies.append(body)
    return [*bodies, toml]


@main.command("new")
@click.argument("slug")
@click.option(
    "--kind",
    type=click.Choice([k.value for k in CampaignKind]),
    help="What the campaign is: newsletter, invitation (with a calendar event and RSVP), "
    "or announcement.",
)
@click.option("--from", "from_slug", metavar="EXISTING", help="Copy this campaign instead.")
@pass_app
def new_cmd(app: App, slug: str, kind: str | None, from_slug: str | None) -> None:
    """Write a new campaign SLUG in the project's campaigns folder, ready to edit.

    It has campaign.toml (sender, default segments) and a Markdown body per language,
    body.es.md and body.en.md, with the subject and preheader at their top. An
    existing folder is never overwritten.

    \b
    Examples:
      clara-mail new spring-2022 --kind newsletter
      clara-mail new conference-2023 --from conference-2022-02-04
    """
    files = new_campaign(app.settings, slug, kind, from_slug)
    click.echo(f"Created campaign {slug} in {files[0].parent}")
    click.echo(
        f"Open {files[0]} to write the message ({', '.join(p.name for p in files[1:])} too)."
    )
    click.echo(f"Then: clara-mail preview {slug} --serve   (see it while you write)")
    click.echo(f"      clara-mail check {slug}")
