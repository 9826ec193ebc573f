"""Markdown bodies: body.<language>.md rendered into the shared layout, checked as any
template (the fast renderer, the text part, every check)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.markdown import markdown_to_html, split_front_matter
from clara_mailer.compose.render import (
    RecipientView,
    Renderer,
    check_campaign,
    compare_renders,
    message_parts,
    parse_message,
)
from clara_mailer.core.errors import CampaignError
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from tests.conftest import TEST_SECRET

CAMPAIGN_TOML = """\
kind = "newsletter"
default_segments = ["local-police"]

[sender]
name = "CLARA"
address = "boletin@clara.example"

[languages.es]
[languages.en]
"""

BODY_ES = """\
---
subject = "Boletín de primavera"
preheader = "Lo que ha pasado"
---
# Primavera en {{ project.acronym }}

{% if name %}Hola, {{ name }}:{% else %}Hola:{% endif %}

Un párrafo con [un enlace](https://proyectoclara.es/informe) y *énfasis*.

## Novedades

- primero
- segundo{% if organisation %} para {{ organisation }}{% endif %}

{% if segment == "local-police" %}
Una nota para la policía local.
{% endif %}

![Cartel de la conferencia](https://proyectoclara.es/cartel.png)

[[Descargar el informe]](https://proyectoclara.es/informe.pdf?a=1&b=2)
"""

BODY_EN = """\
---
subject: Spring newsletter
preheader: What happened
---
Dear {{ name or "colleagues" }},

A paragraph with a [link]({{ project.website }}).

1. first
2. second
"""


@pytest.fixture
def project(tmp_path: Path) -> Settings:
    templates = tmp_path / "campaigns"
    shutil.copytree(EMAIL_TEMPLATES, templates)
    folder = templates / "spring-2022"
    folder.mkdir()
    (folder / "campaign.toml").write_text(CAMPAIGN_TOML, encoding="utf-8")
    (folder / "body.es.md").write_text(BODY_ES, encoding="utf-8")
    (folder / "body.en.md").write_text(BODY_EN, encoding="utf-8")
    return Settings(
        secret_key=TEST_SECRET, base_url="https://clara.example", templates_dir=templates
    )


def _render(settings: Settings, language: str, segment: str = "local-police") -> bytes:
    defn = load_campaign(settings, "spring-2022")
    renderer = Renderer(defn, settings, TokenSigner(TEST_SECRET), 7)
    who = RecipientView(3, "ana@policia.example", "Ana <b>", "Policía & Co", language, segment)
    return renderer.render(who)


def test_a_markdown_campaign_renders_in_the_layout_and_passes_every_check(
    project: Settings,
) -> None:
    defn = load_campaign(project, "spring-2022")
    assert defn.subjects == {"es": "Boletín de primavera", "en": "Spring newsletter"}
    assert defn.preheaders == {"es": "Lo que ha pasado", "en": "What happened"}
    assert defn.template_file("es").name == "body.es.md"
    assert check_campaign(project, "spring-2022") == []

    message = _render(project, "es")
    text, html = message_parts(message)
    assert parse_message(message)["Subject"] == "Boletín de primavera"
    assert '<td class="masthead"' in html and "<h1" in html and "Primavera en CLARA</h1>" in html
    assert "Hola, Ana &lt;b&gt;:" in html  # Jinja output, escaped
    assert 'href="https://proyectoclara.es/informe"' in html and "<em" in html
    assert "<h2" in html and "Novedades</h2>" in html
    assert "segundo para Policía &amp; Co</li>" in html
    assert "Una nota para la policía local." in html
    assert 'alt="Cartel de la conferencia"' in html
    assert '<td class="button"' in html
    assert 'href="https://proyectoclara.es/informe.pdf?a=1&amp;b=2"' in html
    assert "style=" in html  # premailer inlined the shared stylesheet
    assert "https://clara.example/u/" in html and "https://clara.example/u/" in text
    assert "Descargar el informe (https://proyectoclara.es/informe.pdf?a=1&b=2)" in text
    # Another segment: the segment's paragraph is gone.
    assert "policía local." not in message_parts(_render(project, "es", "associations"))[1]

    text, html = message_parts(_render(project, "en"))
    assert "<h1" in html and "Spring newsletter</h1>" in html  # no heading: the subject
    assert "Dear Ana &lt;b&gt;," in html and 'href="https://proyectoclara.es/"' in html
    assert "<ol" in html


def test_fast_and_reference_renders_agree_for_markdown(project: Settings) -> None:
    defn = load_campaign(project, "spring-2022")
    renderer = Renderer(defn, project, TokenSigner(TEST_SECRET), 7)
    for language in ("es", "en"):
        who = RecipientView(3, "o'b@x.example", "Zoë {0} <i>", "", language, "media")
        assert compare_renders(renderer.render(who), renderer.render_reference(who)) == []


def test_an_image_without_alt_text_fails_the_check_naming_file_and_line(
    project: Settings,
) -> None:
    body = project.templates_dir / "spring-2022" / "body.es.md"
    body.write_text(BODY_ES + "\nText.\n\n![](https://proyectoclara.es/foto.jpg)\n", "utf-8")
    problems = check_campaign(project, "spring-2022")
    line = BODY_ES.count("\n") + 4
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"{body}:{line}: image https://proyectoclara.es/foto.jpg has no alt"
    )


def test_a_jinja_error_in_markdown_names_the_markdown_file_and_line(project: Settings) -> None:
    body = project.templates_dir / "spring-2022" / "body.en.md"
    body.write_text(BODY_EN + "\n{% if name %}never closed\n", "utf-8")
    problems = check_campaign(project, "spring-2022")
    assert problems and problems[0].startswith(f"{body}:")
    line = int(problems[0][len(str(body)) + 1 :].split(":")[0])
    assert line == BODY_EN.count("\n") + 2 or line == BODY_EN.count("\n") + 3


def test_front_matter_in_one_place_only(project: Settings) -> None:
    toml = project.templates_dir / "spring-2022" / "campaign.toml"
    toml.write_text(CAMPAIGN_TOML + 'subject = "Otro"\n', "utf-8")
    with pytest.raises(CampaignError, match="given here and in"):
        load_campaign(project, "spring-2022")
    toml.write_text(CAMPAIGN_TOML, "utf-8")
    (toml.parent / "es.html.j2").write_text("x", "utf-8")
    with pytest.raises(CampaignError, match="not both"):
        load_campaign(project, "spring-2022")


def test_front_matter_forms_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "body.es.md"
    assert split_front_matter('---\nsubject = "A"\n---\n# x\n', path) == (
        {"subject": "A"},
        "# x\n",
        3,
    )
    assert split_front_matter("---\nsubject: 'B: c'\n---\n", path)[0] == {"subject": "B: c"}
    assert split_front_matter("# no front matter\n", path) == ({}, "# no front matter\n", 0)
    with pytest.raises(CampaignError, match="unknown key 'subjet'"):
        split_front_matter("---\nsubjet: A\n---\n", path)
    with pytest.raises(CampaignError, match=r"body.es.md:1: the front matter .* never closed"):
        split_front_matter("---\nsubject: A\n", path)
    with pytest.raises(CampaignError, match=r"body.es.md:3: front matter lines"):
        split_front_matter("---\nsubject: A\nnonsense\n---\n", path)


def test_jinja_passes_through_markdown_untouched() -> None:
    html = markdown_to_html(
        "A *b* {{ x | join(', ') }} [l]({{ url }}?q=1) `{{ code }}`\n\n"
        "{% for i in items %}\n- {{ i * 2 }}\n{% endfor %}\n\n"
        "[[Go {{ name }}]]({{ rsvp_yes_url }})\n"
    )
    assert "{{ x | join(', ') }}" in html and 'href="{{ url }}?q=1"' in html
    assert "<code>{{ code }}</code>" in html
    assert "{% for i in items %}\n<ul>\n<li>{{ i * 2 }}</li>\n</ul>\n{% endfor %}" in html
    assert '<a href="{{ rsvp_yes_url }}">Go {{ name }}</a>' in html
    assert "<p><table" not in html
