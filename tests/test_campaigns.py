"""Campaign definitions and the campaigns / check / preview commands."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import select

from clara_mailer.compose.campaigns import list_campaigns, load_campaign, template_hash
from clara_mailer.compose.render import check_campaign, message_parts, parse_message
from clara_mailer.core.errors import CampaignError, NotFound
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from clara_mailer.store.models import Recipient, Segment

TEMPLATES = EMAIL_TEMPLATES
Cli = Callable[..., Result]


def copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    return target


def local_settings(templates: Path) -> Settings:
    return Settings(secret_key="k" * 32, base_url="https://clara.example", templates_dir=templates)


def test_load_and_list_the_shipped_campaigns() -> None:
    settings = local_settings(TEMPLATES)
    defs = {d.slug: d for d in list_campaigns(settings)}
    assert set(defs) == {"newsletter-2022-01", "conference-2022-02-04", "press-release-2022-02-04"}
    news, conf = defs["newsletter-2022-01"], defs["conference-2022-02-04"]
    press = defs["press-release-2022-02-04"]
    assert news.kind == "newsletter" and conf.kind == "invitation"
    assert press.kind == "announcement" and press.event is None
    assert press.default_segments == ("media",)
    assert news.languages == ("es", "en") and news.sender_domain == "oberaxe.example"
    assert news.default_segments[:3] == ("national-authorities", "local-police", "associations")
    assert conf.event is not None and conf.event.start.isoformat() == "2022-02-04T10:30:00+01:00"
    for slug in defs:
        assert check_campaign(settings, slug) == [], slug


def test_template_hash_follows_every_file(tmp_path: Path) -> None:
    settings = local_settings(copy_templates(tmp_path))
    defn = load_campaign(settings, "newsletter-2022-01")
    before = template_hash(defn)
    assert before == template_hash(load_campaign(settings, "newsletter-2022-01"))
    style = Path(settings.templates_dir) / "style.css"
    style.write_text(style.read_text() + "\n/* changed */\n")
    assert template_hash(defn) != before


def test_broken_toml_names_file_line_and_column(tmp_path: Path) -> None:
    settings = local_settings(copy_templates(tmp_path))
    toml = Path(settings.templates_dir) / "newsletter-2022-01" / "campaign.toml"
    toml.write_text('kind = "newsletter"\nlist_id = \n')
    with pytest.raises(CampaignError, match=rf"^{toml}:2:\d+: "):
        load_campaign(settings, "newsletter-2022-01")
    with pytest.raises(NotFound, match="defined: conference-2022-02-04"):
        load_campaign(settings, "no-such-campaign")


def test_check_reports_each_kind_of_problem(tmp_path: Path) -> None:
    settings = local_settings(copy_templates(tmp_path))
    folder = Path(settings.templates_dir) / "newsletter-2022-01"
    toml = folder / "campaign.toml"
    text = toml.read_text().replace(
        'subject = "CLARA project results newsletter (January 2022)"',
        'subject = "' + "A subject that goes on and on " * 3 + '"',
    )
    toml.write_text(text)
    (folder / "es.html.j2").unlink()
    en = (folder / "en.html.j2").read_text().splitlines()
    en.insert(8, "<p>{{ recipient_title }}</p>")
    (folder / "en.html.j2").write_text("\n".join(en) + "\n")
    layout = Path(settings.templates_dir) / "layout.html.j2"
    layout.write_text(layout.read_text().replace('href="{{ unsubscribe_url }}"', 'href="#"'))
    problems = check_campaign(settings, "newsletter-2022-01")
    assert any(p.startswith(f"{folder / 'es.html.j2'}: missing (es version)") for p in problems)
    assert any(f"{folder / 'en.html.j2'}:9: 'recipient_title' is undefined" in p for p in problems)
    assert any("subject is 90 characters, over 78" in p for p in problems)
    # The unsubscribe link is checked in a campaign that still renders.
    conf = check_campaign(settings, "conference-2022-02-04")
    assert any("no unsubscribe link in the HTML" in p for p in conf)


def test_check_reports_syntax_errors_and_oversized_messages(tmp_path: Path) -> None:
    settings = local_settings(copy_templates(tmp_path))
    folder = Path(settings.templates_dir) / "conference-2022-02-04"
    es = folder / "es.html.j2"
    es_source = es.read_text()
    es.write_text(es_source.replace("{% endif %}", "{% endfi %}", 1))
    en = folder / "en.html.j2"
    en.write_text(en.read_text().replace("<h2>Programme</h2>", "<p>" + "relleno " * 15000 + "</p>"))
    problems = check_campaign(settings, "conference-2022-02-04")
    line = 1 + es_source.splitlines().index(
        next(x for x in es_source.splitlines() if "{% endif %}" in x)
    )
    assert any(p.startswith(f"{es}:{line}: ") and "endfi" in p for p in problems), problems
    assert any("over 100 kB (Gmail clips at 102 kB)" in p for p in problems)


def test_cli_campaigns_lists_rows(cli: Cli) -> None:
    result = cli("campaigns", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["slug"]: r for r in json.loads(result.output)}
    assert rows["conference-2022-02-04"]["kind"] == "invitation"
    assert rows["newsletter-2022-01"]["languages"] == "es, en"
    assert "national-authorities" in rows["newsletter-2022-01"]["default_segments"]
    assert "Example:" in cli("campaigns", "--help").output


def test_cli_check_ok_and_broken(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = cli("check", "newsletter-2022-01")
    assert ok.exit_code == 0 and "newsletter-2022-01: OK" in ok.output
    templates = copy_templates(tmp_path)
    page = templates / "newsletter-2022-01" / "en.html.j2"
    lines = page.read_text().splitlines()
    lines[10] += " {{ favourite_colour }}"
    page.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("CLARA_TEMPLATES_DIR", str(templates))
    from click.testing import CliRunner

    from clara_mailer.cli import main

    result = CliRunner().invoke(main, ["check", "newsletter-2022-01"], catch_exceptions=False)
    assert result.exit_code == 2
    assert f"{page}:11: 'favourite_colour' is undefined" in result.output
    assert "Traceback" not in result.output
    missing = cli("check", "nothing-here")
    assert missing.exit_code == 1 and "no campaign 'nothing-here'" in missing.output


def test_cli_preview_sample_and_registry_recipient(cli: Cli, db: Database, tmp_path: Path) -> None:
    out = tmp_path / "inv.eml"
    result = cli("preview", "conference-2022-02-04", "--language", "en", "--format", "eml",
                 "--output", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    msg = parse_message(out.read_bytes())
    assert msg["Subject"] == "Invitation: CLARA Final Conference, Madrid, 4 February 2022"
    assert msg.get_content_type() == "multipart/mixed"

    with db.session() as s:
        seg = s.scalars(select(Segment).where(Segment.slug == "associations")).first()
        if seg is None:  # the migration seeds the standard segments; be sure anyway
            seg = Segment(slug="associations", name="Associations and social entities")
        s.add(Recipient(email="lucia@asociacion.example", email_key="lucia@asociacion.example",
                        name="Lucía Ortega", organisation="Asociación Nakera", language="es",
                        segments=[seg]))  # fmt: skip
    html = cli("preview", "newsletter-2022-01", "--recipient", "Lucia@Asociacion.example")
    assert html.exit_code == 0, html.output
    assert "A la atención de: Lucía Ortega (Asociación Nakera)" in html.output
    assert "Para las asociaciones y entidades sociales:" in html.output
    text = cli("preview", "newsletter-2022-01", "--recipient", "lucia@asociacion.example",
               "--format", "text")  # fmt: skip
    assert "A la atención de: Lucía Ortega" in text.output and "<p" not in text.output
    unknown = cli("preview", "newsletter-2022-01", "--recipient", "nobody@example.example")
    assert unknown.exit_code == 1 and "no recipient" in unknown.output


def test_preview_parts_match_message(cli: Cli, tmp_path: Path) -> None:
    eml = tmp_path / "n.eml"
    cli("preview", "newsletter-2022-01", "--language", "es", "--segment", "local-police",
        "--format", "eml", "--output", str(eml))  # fmt: skip
    text, _html = message_parts(eml.read_bytes())
    got = cli("preview", "newsletter-2022-01", "--language", "es", "--segment", "local-police",
              "--format", "text")  # fmt: skip
    assert got.output == text
