"""A project folder of the user's own: ``init``, finding it like git, ``new`` campaigns."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_mailer.cli import main
from clara_mailer.cli.project import settings_file_text
from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.render import check_campaign
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import CONFIG_FILE, Settings, find_project, load_settings
from tests.conftest import REPO_ROOT

# `installed_venv`: the non-editable install of tests/install_helpers.py, a session fixture
# (tests/conftest.py), built once for this module and tests/test_packaging.py.

SHIPPED = sorted(p.name for p in EMAIL_TEMPLATES.iterdir() if p.is_dir())


pytestmark = pytest.mark.usefixtures("clean_environment")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def test_init_writes_a_project_with_every_setting(tmp_path: Path) -> None:
    result = run("init", "boletines")
    assert result.exit_code == 0, result.output
    project = tmp_path / "boletines"
    assert "clara-mail new" in result.output
    text = (project / CONFIG_FILE).read_text(encoding="utf-8")
    for f in fields(Settings):
        assert f"{f.name} = " in text, f"{f.name} missing from the generated {CONFIG_FILE}"
    for name in ("sender_legal_name", "sender_postal_address", "controller_contact"):
        assert f'\n{name} = ""\n' in text  # the legal footer, to fill in
    assert tomllib.loads(text)["templates_dir"] == "campaigns"
    # Uncommenting any default keeps a valid file (the comments are real TOML values).
    for line in text.splitlines():
        if line.startswith("# ") and " = " in line and "(not set)" not in line:
            tomllib.loads(line[2:])
    for name in ("layout.html.j2", "style.css", "project.toml", *SHIPPED):
        assert (project / "campaigns" / name).exists(), name
    assert (
        (project / "recipients" / "plantilla.csv")
        .read_text(encoding="utf-8")
        .startswith("Correo electrónico,")
    )
    assert (project / "recipients" / "template.csv").read_text().startswith("Email,")
    ignore = (project / ".gitignore").read_text()
    assert "*.db" in ignore and "/outbox/" in ignore

    settings = load_settings(project, {})
    assert settings.templates_dir == project / "campaigns"
    assert settings.outbox_dir == project / "outbox"
    assert settings.database_url == f"sqlite:///{project / 'clara-mail.db'}"
    for slug in SHIPPED:
        assert check_campaign(settings, slug) == [], slug


def test_init_refuses_a_project_and_writes_over_nothing(tmp_path: Path) -> None:
    assert run("init", "p").exit_code == 0
    toml = tmp_path / "p" / CONFIG_FILE
    toml.write_text('base_url = "https://mine.example"\n')
    result = run("init", "p")
    assert result.exit_code == 2 and "is a project already" in result.output
    assert toml.read_text() == 'base_url = "https://mine.example"\n'
    # A folder with other files of its own is fine, unless a file would be overwritten.
    other = tmp_path / "q"
    (other / "recipients").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    (other / "recipients" / "template.csv").write_text("mine")
    result = run("init", str(other))
    assert result.exit_code == 2 and "template.csv exists" in result.output
    assert not (other / CONFIG_FILE).exists()
    assert (other / "recipients" / "template.csv").read_text() == "mine"


def test_commands_find_the_project_like_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("init", "p")
    project = tmp_path / "p"
    deep = project / "campaigns" / "newsletter-2022-01"
    monkeypatch.chdir(deep)
    assert find_project() == project
    config = run("config").output
    assert f"templates_dir = {project / 'campaigns'}" in config
    assert f"outbox_dir = {project / 'outbox'}" in config
    assert "newsletter-2022-01" in run("campaigns", "--format", "csv").output
    # Elsewhere: --project DIR, or CLARA_PROJECT.
    monkeypatch.chdir(tmp_path)
    assert find_project() is None
    assert f"outbox_dir = {project / 'outbox'}" in run("--project", "p", "config").output
    via_env = run("config", env={"CLARA_PROJECT": str(project)}).output
    assert f"outbox_dir = {project / 'outbox'}" in via_env
    bad = run("--project", str(tmp_path), "config")
    assert bad.exit_code == 2 and f"no {CONFIG_FILE} in {tmp_path}" in bad.output
    bad = run("config", env={"CLARA_PROJECT": str(tmp_path)})
    assert bad.exit_code == 2 and bad.output.startswith("Error: CLARA_PROJECT: no clara-mail.toml")


def test_the_checkout_stays_a_project_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a fresh clone (no clara-mail.toml of a developer's), the repository's own
    templates, database and outbox are used, as the README's first command needs."""
    if (REPO_ROOT / CONFIG_FILE).exists():
        pytest.skip("this checkout has a clara-mail.toml of its own")
    monkeypatch.chdir(REPO_ROOT)
    settings = load_settings(environ={})
    assert settings.templates_dir == REPO_ROOT / "templates" / "email"
    assert settings.database_url == "sqlite:///clara-mail.db"
    assert settings.outbox_dir == Path("outbox")


@pytest.mark.parametrize("kind", ["newsletter", "invitation", "announcement"])
def test_new_writes_a_campaign_that_passes_its_check(tmp_path: Path, kind: str) -> None:
    run("init", "p")
    project = tmp_path / "p"
    result = run("--project", "p", "new", "spring-2022", "--kind", kind)
    assert result.exit_code == 0, result.output
    folder = project / "campaigns" / "spring-2022"
    assert f"Open {folder / 'body.es.md'}" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["body.en.md", "body.es.md", "campaign.toml"]
    settings = load_settings(project, {})
    defn = load_campaign(settings, "spring-2022")
    assert defn.kind == kind and set(defn.languages) == {"es", "en"}
    assert defn.subjects["es"] and defn.subjects["en"] and defn.preheaders["en"]
    assert check_campaign(settings, "spring-2022") == []


def test_new_validates_the_name_and_never_overwrites(tmp_path: Path) -> None:
    run("init", "p")
    folder = tmp_path / "p" / "campaigns"
    for bad in ("Spring", "-spring", "spring_2022", "a" * 65, "../x"):
        result = run("--project", "p", "new", "--kind", "newsletter", "--", bad)
        assert result.exit_code == 2 and "is not a campaign name" in result.output, bad
    assert run("--project", "p", "new", "s", "--kind", "newsletter").exit_code == 0
    (folder / "s" / "body.es.md").write_text("mine", encoding="utf-8")
    result = run("--project", "p", "new", "s", "--kind", "announcement")
    assert result.exit_code == 2 and "exists" in result.output
    assert (folder / "s" / "body.es.md").read_text() == "mine"
    result = run("--project", "p", "new", "newsletter-2022-01", "--kind", "newsletter")
    assert result.exit_code == 2
    assert run("--project", "p", "new", "t").exit_code == 2  # no --kind, no --from


def test_new_from_an_existing_campaign_copies_it(tmp_path: Path) -> None:
    run("init", "p")
    result = run("--project", "p", "new", "newsletter-2022-06", "--from", "newsletter-2022-01")
    assert result.exit_code == 0, result.output
    copy = tmp_path / "p" / "campaigns" / "newsletter-2022-06"
    original = tmp_path / "p" / "campaigns" / "newsletter-2022-01"
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in original.iterdir())
    assert check_campaign(load_settings(tmp_path / "p", {}), "newsletter-2022-06") == []
    result = run("--project", "p", "new", "x", "--from", "no-such-campaign")
    assert result.exit_code == 1 and "no campaign 'no-such-campaign'" in result.output


def test_the_settings_file_text_is_valid_toml() -> None:
    data = tomllib.loads(settings_file_text())
    assert data["database_url"] == "sqlite:///clara-mail.db" and data["outbox_dir"] == "outbox"


# -- the acceptance test: a new user, a non-editable install -------------------------

SPRING_ES = """\
---
subject = "Boletín de primavera de CLARA"
preheader = "Las novedades del proyecto esta primavera"
---
# Boletín de primavera

{% if name %}Hola, {{ name }}:{% else %}Hola:{% endif %}

Esta primavera publicamos la **guía metodológica** de las Comunidades Locales de
Aprendizaje. Puede leerla en [la web del proyecto](https://proyectoclara.es/).

## Novedades

- La guía, en español
- Las descargas de las siete comunidades

![Portada de la guía metodológica](https://proyectoclara.es/guia.png)

[[Descargar la guía]](https://proyectoclara.es/guia.pdf)
"""

SPRING_EN = """\
---
subject: CLARA spring newsletter
preheader: What is new in the project this spring
---
# Spring newsletter

{% if name %}Dear {{ name }},{% else %}Dear colleagues,{% endif %}

This spring we publish the **methodological guide** of the Local Learning Communities.
Read it on [the project website](https://proyectoclara.es/).

1. The guide, in Spanish
2. The downloads of the seven communities

[[Download the guide]](https://proyectoclara.es/guide.pdf)
"""


@pytest.mark.packaging
def test_a_new_user_makes_and_sends_a_markdown_campaign_with_the_installed_wheel(
    installed_venv: Path, tmp_path: Path
) -> None:
    import re

    from clara_mailer.compose.render import message_parts, parse_message
    from tests.install_helpers import clean_env
    from tests.install_helpers import run as run_ok

    empty = tmp_path / "new-user"
    empty.mkdir()
    env = clean_env(installed_venv)

    def clara(*args: str, cwd: Path) -> str:
        return run_ok([installed_venv / "bin" / "clara-mail", *args], cwd=cwd, env=env).stdout

    clara("init", "boletines", cwd=empty)
    project = empty / "boletines"
    out = clara("new", "spring-2022", "--kind", "newsletter", cwd=project)
    folder = project / "campaigns" / "spring-2022"
    assert f"Open {folder / 'body.es.md'}" in out
    (folder / "body.es.md").write_text(SPRING_ES, encoding="utf-8")
    (folder / "body.en.md").write_text(SPRING_EN, encoding="utf-8")
    # From a subfolder: the project is found as git finds a repository.
    assert "spring-2022: OK" in clara("check", "spring-2022", cwd=folder)

    (project / "recipients" / "police.csv").write_text(
        (project / "recipients" / "plantilla.csv").read_text(encoding="utf-8")
        + "ana@policia-getafe.example,Ana Pérez,Policía Local de Getafe,local-police,es,ES,"
        "interés legítimo,directorio público\n"
        "ben@association.example,,An Association,associations,en,,legitimate interest,"
        "public directory\n",
        encoding="utf-8",
    )
    clara("import", "recipients/police.csv", cwd=project)
    clara("send", "spring-2022", "--segment", "local-police", "--segment", "associations",
          "--yes", cwd=project)  # fmt: skip
    sent = sorted((project / "outbox" / "spring-2022").glob("*.eml"))
    assert len(sent) == 2
    assert (project / "clara-mail.db").is_file()
    subjects = {"es": "Boletín de primavera de CLARA", "en": "CLARA spring newsletter"}
    for path in sent:
        data = path.read_bytes()
        # The message standards the shipped campaigns meet.
        assert b"\n" not in data.replace(b"\r\n", b"")
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        assert data.isascii()
        msg = parse_message(data)
        for header in ("Date", "From", "To", "Subject", "Message-ID", "MIME-Version"):
            assert msg[header], header
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        unsubscribe = re.search(
            r"<(http://127\.0\.0\.1:8025/u/[a-z2-7]+)>", msg["List-Unsubscribe"]
        )
        assert unsubscribe and "<mailto:" in msg["List-Unsubscribe"]
        assert msg.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in msg.get_payload()] == ["text/plain", "text/html"]
        text, html = message_parts(data)
        assert unsubscribe.group(1) in text and f'href="{unsubscribe.group(1)}"' in html
        spanish = "ana@" in str(msg["To"])
        assert msg["Subject"] == subjects["es" if spanish else "en"]
        assert 'style="' in html and '<td class="button"' in html
        assert "847508" in text  # the shared layout's legal footer
        if spanish:
            assert "Hola, Ana Pérez:" in text and "guía metodológica" in html
            assert 'alt="Portada de la guía metodológica"' in html
        else:
            assert "Dear colleagues," in text and "<ol" in html
