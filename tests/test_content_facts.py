"""The shipped registry and campaigns say what the CLARA report says, and nothing else.

The source is the CLARA transferability report D.5.2 (January 2022). This test holds its
OWN copy of the report's facts (organisations, figures, products and contacts, programme,
partners, co-funding) and compares them with

- the registry in ``recipients/*.csv`` (section 5.3, 5.7; sample press rows for 5.6);
- the campaigns' data files (``templates/email/project.toml`` and each campaign's
  ``data.toml``), which the templates loop over;
- the messages ``clara-mail preview`` writes, in both languages and in both parts (text
  and HTML), so that a template edit cannot drop or invent a fact silently.

Where the report is inconsistent (a contact printed two ways), the expected value below
is the one the shipped data uses, and a comment says so.
"""

from __future__ import annotations

import csv
import datetime as dt
import email
import email.policy
import html
import json
import re
import tomllib
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
RECIPIENTS = ROOT / "recipients"
TEMPLATES = ROOT / "templates" / "email"
NEWSLETTER = "newsletter-2022-01"
INVITATION = "conference-2022-02-04"
PRESS = "press-release-2022-02-04"
CAMPAIGNS = (NEWSLETTER, INVITATION, PRESS)
LANGUAGES = ("es", "en")

# --- the report's facts (this test's own copy) -----------------------------------------

# Section 5.3: the three lists the results newsletter is shared with.
NATIONAL_AUTHORITIES = [
    "Consejo General del Poder Judicial",
    "Fiscalía General del Estado",
    "Ministerio de Justicia",
    "Ministerio del Interior",
    "Ministerio de Igualdad",
    "Ministerio de Inclusión, Seguridad Social y Migraciones",
    "Ministerio de Educación",
    "Ministerio de Cultura y Deporte",
    "Ministerio de Sanidad, Consumo y Bienestar Social",
]
LOCAL_POLICE_CITIES = [
    "Denia", "Córdoba", "Granada", "Valencia", "Albacete", "A Coruña", "Alcobendas",
    "Móstoles", "Murcia", "Sabadell", "Vitoria", "Valladolid", "Zaragoza", "Castellón",
    "Palma de Mallorca", "Vigo", "Las Palmas de Gran Canaria", "Burgos",
    "Cornellá de Llobregat", "Cambados", "Bilbao", "Burela", "Tarragona",
]  # fmt: skip
ASSOCIATIONS = [
    "Foro para la Integración social de los Inmigrantes",
    "Consejo de Víctimas de Delitos de Odio y Discriminación",
    "Plataforma del Tercer Sector",
    "Consejo para la Eliminación de la Discriminación Racial o Étnica",
    "Consejo Estatal del Pueblo Gitano",
    "Plataforma de la Infancia",
    "Provienda",
    "Active Africa",
    "Alborea Asociación",
    "Asociación Promoción Gitana La Rioja",
    "Asociación Barró",
    "Asociación Musulmana por los Derechos Humanos",
    "Cáritas",
    "CEPAIM",
    "Ecos do Sur",
    "FAGIC",
    "Fundación Al Fanar",
    "ACOBE",
    "FUNCI",
    "Fundea",
    "Fundación Secretariado Gitano",
    "Movimiento por la Paz",
    "Open Society Foundation",
    "OXFAM Intermón",
    "Plataforma Khetane",
    "Salam Plan",
    "ARI Perú",
    "ECCOS de Paz",
    "Fundación Cibervoluntarios",
    "ENWAD",
    "CEAR Euskadi",
    "Asociación Por Ti Mujer",
    "Asociación Karibu",
    "AISE (Asociación Inmigrantes Senegaleses)",
    "Asociación Cultural KOTI",
    "ATIM (Asociación Trabajadores Inmigrantes Marroquíes)",
    "PAREM Murcia",
    "AEII (Asociación Educativa por la Integración y la Igualdad)",
    "Rasinet",
    "Asociación Raíces Bolivianas",
    "Negociado de Diversidad Cultural de Donostia",
    "Servicio de Ciudadanía e Inmigración de Palamós",
    "Concejalía de Bienestar Social, Diversidad y Cooperación de Guadalajara",
    "Oficina Municipal de Inmigración de Roquetas de Mar",
    "Convivencia e Integración, Cooperación e Inmigración (Torrevieja)",
    "PANGEA Guardamar del Segura",
    "Servicio de Atención y Mediación Intercultural de Vicar",
    "Concejalía de Servicios Sociales, Inmigración y Sanidad de Beniel",
    "Interculturalidad y Nueva Ciudadanía de Esplugues de Llobregat",
    "Departamento de Inmigración de Formentera",
    "Negociado de Inmigración de Bilbao",
    "Negociado de Cooperación al Desarrollo e Inmigración de Málaga",
    "Concejalía de Inmigración y Cooperación al Desarrollo de Santander",
    "Departamento de Inmigración de Arrecife",
    "Concejalía de Relación con Residentes de Otras Nacionalidades y Pangea de Alfaz del Pi",
    "Departamento de Inmigración de Ciudad Real",
    "Departamento de Inmigración y Refugio de Madrid",
    "Concejalía de Inmigración, Cooperación y Voluntariado, Departamento de Inmigración de "
    "Alicante",
    "Movimiento contra la Intolerancia",
]
# The report's section 5.3 lists 9 + 23 + 59 organisations (91; not 100: the association
# list has 59 entries).
SEGMENT_COUNTS = {"national-authorities": 9, "local-police": 23, "associations": 59}
# Section 5.7: ENAR, ECCAR and the three partner cities that are ECCAR members.
CITY_NETWORKS = [
    "ENAR (European Network Against Racism)",
    "ECCAR (European Coalition of Cities Against Racism)",
    "Ayuntamiento de Getafe",
    "Ayuntamiento de Madrid",
    "Ayuntamiento de Málaga",
]

# Section 2: the consortium (Madrid's Municipal Police coordinates) and the co-funding.
PARTNERS_EN = [
    "Municipal Police of Madrid (City Council of Madrid)",
    "University of Salamanca",
    "Spanish Observatory on Racism and Xenophobia (OBERAXE) of the Ministry of Inclusion, "
    "Social Security and Migrations",
    "social cooperative Dinamia",
    "Bradford Hate Crime Alliance",
]
PARTNERS_ES = [
    "Policía Municipal de Madrid (Ayuntamiento de Madrid)",
    "Universidad de Salamanca",
    "Observatorio Español del Racismo y la Xenofobia (OBERAXE) del Ministerio de Inclusión, "
    "Seguridad Social y Migraciones",
    "cooperativa social Dinamia",
    "Bradford Hate Crime Alliance",
]
PARTNER_POLICE_CITIES = ["Elche", "Fuenlabrada", "Getafe", "Málaga", "Leganés", "Pamplona"]
CLAP_CITIES = {"Elche", "Fuenlabrada", "Getafe", "Madrid", "Málaga", "Leganés", "Pamplona"}
FUNDING_EN = "co-funded by the Rights, Equality and Citizenship Programme (2014-2020)"
FUNDING_ES = "cofinanciado por el Programa Derechos, Igualdad y Ciudadanía (2014-2020)"
GRANT = "REC-AG-2018/REC-RRAC-HATE-AG-2018"
GRANT_AGREEMENT = "847508"
WEBSITE = "https://proyectoclara.es/"
TWITTER, HASHTAG = "@ClaraProyecto", "#CLARAProject"

# Sections 2 and 3: figures.
FIGURES = {
    "claps": "7",
    "police_officers": "136",
    "community_participants": "65",
    "bradford_officers": "21",
    "handbooks": "4",
    "specialised_units": "3",
}
# Section 5.2 and 5.1.
RESULTS_REPORT_URL = (
    "https://proyectoclara.es/wp-content/uploads/2022/01/Publicacion-Final-CLARA.pdf"
)
VIDEO_MINUTES = 6  # "In almost 6 minutes"; subtitled in English

# Section 4, Table 1: (product, type, police organisation's city, contact as printed).
PRODUCTS = [
    ("Community relations unit and technical bureau", "Framework for collaboration", "Elche",
     "proyectoclaraelche@gmail.com"),
    ("Alliance for Tolerance and Against Hate", "Framework for collaboration", "Fuenlabrada",
     "policiaydiversidad@ayto-fuenlabrada.es"),
    ("Joint Bureau (institutional and social entities)", "Framework for collaboration",
     "Getafe", "policia.jefatura@ayto-getafe.org"),
    ("Partnership agreement with associations", "Framework for collaboration", "Pamplona",
     "sjefatu@pamplona.es"),
    ("Handbook on dealing with hate crimes, racism and xenophobia", "Protocol", "Leganés",
     "Imbris@leganes.org"),
    ("Racism, Xenophobia and other forms of intolerance: a handbook for police action",
     "Protocol", "Madrid", "gestiondiversidadpmm@madrid.es"),
    ("Police Hate Crime Manual", "Protocol", "Málaga", "rfcampos@malaga.eu"),
    ("Hate Crime Policing Manual", "Protocol", "Getafe", "policia.jefatura@ayto-getafe.org"),
    ("Diversity Management Unit", "Specialized unit", "Getafe",
     "policia.jefatura@ayto-getafe.org"),
    # Table 1 prints Elche's address in the methodology column of this row.
    ("Hate Crime Unit", "Specialized unit", "Elche", "proyectoclaraelche@gmail.com"),
    ("Hate and diversity sub-group", "Specialized unit", "Málaga", "rffcampos@malaga.eu"),
    ("Community Liaison Officer", "Specialized unit", "Madrid",
     "gestiondiversidadpmm@madrid.es"),
    ("Training in mediation in intercultural settings", "Training", "Getafe",
     "policia.jefatura@ayto-getafe.org"),
    ("Training in identifying, preventing, and dealing with hate incidents and hate crimes",
     "Training", "Málaga", "rffcampos@malaga.eu"),
]  # fmt: skip
# Section 4: copy in the methodological contact (printed "cantón@usal.es" and
# "canton@usal.es"; the second is used) and the coordination.
METHODOLOGY = ("Concha Antón", "canton@usal.es")
COORDINATION = "dri.pm@madrid.es"
# Section 4: the pages of the web portal the report names.
WEBSITE_PAGES_EN = [
    "Methodological Guide of Local Learning Communities",
    "Lessons learned in Europe: the role of local police in tackling racism, xenophobia and "
    "hate speech",
    "Downloads of the Local Learning Communities (Elche, Fuenlabrada, Getafe, Madrid, Málaga, "
    "Leganés and Pamplona)",
]

# Section 5.5: the Final Conference and its programme.
CONFERENCE_DATE = dt.date(2022, 2, 4)
CONFERENCE_CITY = "Madrid"
GUESTS_MORE_THAN = 100
PROGRAMME = [
    ("10:30", "10:45", "Opening session",
     ["Madrid City Council", "State Secretariat for Migration", "European Commission delegates"],
     []),
    ("10:45", "11:15", "Project presentation: consortium, objectives and development",
     ["Madrid Municipal Police", "Spanish Observatory of Racism and Xenophobia", "Dinamia"], []),
    ("11:15", "11:45", "Local Learning Communities (CLAP)", ["University of Salamanca"], []),
    ("11:45", "12:00", "Break", [], []),
    ("12:00", "13:15", "Presentation of the products and results of the CLAPs", [], []),
    ("13:15", "13:45", "Speeches by the authorities of the participating cities", [],
     ["Madrid", "Málaga", "Elche", "Pamplona", "Fuenlabrada", "Leganés", "Getafe"]),
    ("13:45", "13:50", "Closing of the day", [], []),
]  # fmt: skip
PROGRAMME_ES_SPEAKERS = {
    "10:30": ["Ayuntamiento de Madrid", "Secretaría de Estado de Migraciones",
              "Delegados de la Comisión Europea"],
    "10:45": ["Policía Municipal de Madrid", "Observatorio Español del Racismo y la Xenofobia",
              "Dinamia"],
    "11:15": ["Universidad de Salamanca"],
}  # fmt: skip

# Section 5.6 and 1 (press release).
PRESS_RELEASE_PAGE = "https://www.inclusion.gob.es/oberaxe/es/destacados/index.htm"
HATE_CRIME_INCREASE_MORE_THAN = 9
PRODUCT_CATEGORY_CITIES = [
    ["Elche", "Getafe", "Málaga"],  # 3.3 specialised units created
    ["Getafe", "Leganés", "Madrid", "Málaga"],  # 3.1 handbooks
    ["Getafe", "Málaga"],  # 3.2 training programmes
    [],  # 3.4 liaison officer, proposed by the Municipal Police of Madrid
    ["Elche", "Getafe", "Fuenlabrada", "Leganés", "Pamplona"],  # 3.5 frameworks
]

# Section 5.3: OBERAXE sends the newsletter; 5.5: and the press release.
OBERAXE_ES = "Observatorio Español del Racismo y la Xenofobia (OBERAXE)"
OBERAXE_EN = "Spanish Observatory on Racism and Xenophobia (OBERAXE)"

# What the report does not say, and the shipped content must not either.
INVENTED = [
    "Montalbán", "CentroCentro", "Cibeles", "31 de enero", "31 January", "aforo",
    "places are limited", "en directo", "streamed", "Estimado/a", "Riga", "Lisboa",
    "Sevilla", "Barcelona", "rapid", "rápida", "trimestral", "quarterly",
]  # fmt: skip


# --- helpers ---------------------------------------------------------------------------


def load_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def project() -> dict:
    return load_toml(TEMPLATES / "project.toml")


def data(slug: str) -> dict:
    return load_toml(TEMPLATES / slug / "data.toml")


def campaign(slug: str) -> dict:
    return load_toml(TEMPLATES / slug / "campaign.toml")


def read_rows(name: str) -> list[dict[str, str]]:
    with (RECIPIENTS / name).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


HEADER = [
    "Correo electrónico", "Nombre", "Organización", "Segmento", "Idioma", "País",
    "Base jurídica", "Origen",
]  # fmt: skip


def squash(text: str) -> str:
    return " ".join(text.split())


# --- the registry ----------------------------------------------------------------------


def test_registry_lists_the_organisations_of_section_5_3() -> None:
    files = {
        "national-authorities": ("national-authorities.csv", NATIONAL_AUTHORITIES),
        "local-police": (
            "local-police.csv",
            [f"Policía local de {city}" for city in LOCAL_POLICE_CITIES],
        ),
        "associations": ("associations.csv", ASSOCIATIONS),
    }
    seen_orgs: set[str] = set()
    for segment, (name, expected) in files.items():
        with (RECIPIENTS / name).open(encoding="utf-8", newline="") as handle:
            assert next(csv.reader(handle)) == HEADER
        rows = read_rows(name)
        assert len(rows) == SEGMENT_COUNTS[segment] == len(expected)
        assert [r["Organización"] for r in rows] == expected  # spelling, accents, order
        for r in rows:
            assert r["Segmento"] == segment  # one segment per row: the counts hold
            assert r["Nombre"] == ""  # the report names no department
            assert r["Idioma"] == "es"
            assert r["Base jurídica"] == "interés legítimo"
            assert "sección 5.3" in r["Origen"] and "ejemplo" in r["Origen"]
        orgs = {r["Organización"] for r in rows}
        assert not orgs & seen_orgs
        seen_orgs |= orgs


def test_registry_city_networks_and_media() -> None:
    networks = read_rows("city-networks.csv")
    assert [r["Organización"] for r in networks] == CITY_NETWORKS
    assert {r["Segmento"] for r in networks} == {"city-networks"}
    assert all("sección 5.7" in r["Origen"] for r in networks)
    assert [r["Idioma"] for r in networks[:2]] == ["en", "en"]  # ENAR, ECCAR
    media = read_rows("media.csv")
    assert media and {r["Segmento"] for r in media} == {"media"}
    # The report names no outlet: every row says it is a sample.
    assert all(re.search(r"ejemplo|example", r["Organización"]) for r in media)
    assert all("no nombra medios" in r["Origen"] for r in media)


def test_registry_addresses_are_reserved_and_unique() -> None:
    addresses = []
    for path in sorted(RECIPIENTS.glob("*.csv")):
        for r in read_rows(path.name):
            address = r["Correo electrónico"]
            assert re.fullmatch(r"[a-z0-9.-]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.example", address)
            addresses.append(address.casefold())
    assert len(addresses) == len(set(addresses)) == 91 + 5 + len(read_rows("media.csv"))


# --- shared facts (project.toml) -------------------------------------------------------


def test_project_facts() -> None:
    p = project()
    assert [x["en"] for x in p["partners"]] == PARTNERS_EN
    assert [x["es"] for x in p["partners"]] == PARTNERS_ES
    assert [x["key"] for x in p["partners"] if x["coordinator"]] == ["madrid"]
    assert p["consortium"]["partner_police_cities"] == PARTNER_POLICE_CITIES
    assert set(p["consortium"]["clap_cities"]) == CLAP_CITIES
    assert len(p["consortium"]["clap_cities"]) == int(FIGURES["claps"])
    assert FUNDING_EN in p["funding"]["en"] and FUNDING_ES in p["funding"]["es"]
    assert p["funding"]["call"] == GRANT
    assert p["funding"]["grant_agreement"] == GRANT_AGREEMENT
    assert p["website"] == WEBSITE
    assert (p["twitter"], p["hashtag"]) == (TWITTER, HASHTAG)
    assert {k: v["value"] for k, v in p["figures"].items()} == FIGURES
    assert p["bradford"]["police"] == "West Yorkshire Police"
    assert p["bradford"]["alliance"] == "Bradford Hate Crime Alliance"
    assert p["bradford"]["country_en"] == "United Kingdom"
    assert p["results_report"]["url"] == RESULTS_REPORT_URL
    assert "Salamanca" in p["results_report"]["author_en"]
    assert p["video"]["minutes"] == VIDEO_MINUTES
    assert p["video"]["subtitles_en"] == "English"
    fc = p["final_conference"]
    assert (fc["date"], fc["city"], fc["timezone"]) == (CONFERENCE_DATE, "Madrid", "Europe/Madrid")
    assert (fc["start"], fc["end"]) == (PROGRAMME[0][0], PROGRAMME[-1][1])
    assert (fc["date_en"], fc["date_es"]) == ("4 February 2022", "4 de febrero de 2022")
    assert fc["guests_more_than"] == GUESTS_MORE_THAN


# --- the newsletter (section 5.3) ------------------------------------------------------


def test_newsletter_facts() -> None:
    d = data(NEWSLETTER)
    types = {t["key"]: t["en"] for t in d["product_types"]}
    got = [(x["en"], types[x["type"]], x["city"], x["contact"]) for x in d["products"]]
    assert got == PRODUCTS
    assert all(x["es"] for x in d["products"])
    assert set(types.values()) == {
        "Framework for collaboration", "Protocol", "Specialized unit", "Training",
    }  # fmt: skip
    c = d["contacts"]
    assert (c["methodology_name"], c["methodology_email"]) == METHODOLOGY
    assert c["coordination_email"] == COORDINATION
    assert [page["en"].split(" (in Spanish)")[0] for page in d["website_pages"]] == (
        WEBSITE_PAGES_EN
    )
    assert len(d["results_report_highlights"]) == 6  # the six things 5.2 says it contains
    assert set(d["segment_notes"]) == {
        "national-authorities", "local-police", "associations", "city-networks", "default",
    }  # fmt: skip
    toml = campaign(NEWSLETTER)
    assert toml["sender"]["name"] == OBERAXE_ES
    assert toml["languages"]["es"]["sender_name"] == OBERAXE_ES
    assert toml["languages"]["en"]["sender_name"] == OBERAXE_EN
    assert toml["sender"]["address"].endswith(".example")
    assert toml["default_segments"][:3] == list(SEGMENT_COUNTS)
    for lang in LANGUAGES:
        preheader = toml["languages"][lang]["preheader"]
        for value in (FIGURES["police_officers"], FIGURES["community_participants"]):
            assert value in preheader


# --- the invitation (section 5.5) ------------------------------------------------------


def test_invitation_facts() -> None:
    d = data(INVITATION)
    got = [(x["start"], x["end"], x["en"], x["speakers_en"], x["cities"]) for x in d["programme"]]
    assert got == PROGRAMME
    for item in d["programme"]:
        assert len(item["speakers_es"]) == len(item["speakers_en"]) and item["es"]
        if item["start"] in PROGRAMME_ES_SPEAKERS:
            assert item["speakers_es"] == PROGRAMME_ES_SPEAKERS[item["start"]]
    # Times follow each other without a gap from 10:30 to 13:50.
    for before, after in zip(d["programme"], d["programme"][1:], strict=False):
        assert before["end"] == after["start"]
    toml = campaign(INVITATION)
    event = toml["event"]
    madrid = ZoneInfo(event["timezone"])
    start = event["start"].replace(tzinfo=madrid)
    end = event["end"].replace(tzinfo=madrid)
    assert start == dt.datetime(2022, 2, 4, 10, 30, tzinfo=ZoneInfo("Europe/Madrid"))
    assert end == dt.datetime(2022, 2, 4, 13, 50, tzinfo=ZoneInfo("Europe/Madrid"))
    # The report names no venue: empty settings, the city only.
    assert (event["venue_name"], event["venue_address"]) == ("", "")
    assert "address" not in event
    for lang in LANGUAGES:
        assert toml["languages"][lang]["event_place"] == CONFERENCE_CITY
    assert toml["kind"] == "invitation"


# --- the press release (sections 5.5, 5.6) ---------------------------------------------


def test_press_release_facts() -> None:
    d = data(PRESS)
    assert d["published_at"] == PRESS_RELEASE_PAGE
    assert d["context"]["hate_crime_increase_more_than_percent"] == HATE_CRIME_INCREASE_MORE_THAN
    assert [c["cities"] for c in d["product_categories"]] == PRODUCT_CATEGORY_CITIES
    assert "Madrid" in d["product_categories"][3]["en"]
    toml = campaign(PRESS)
    assert toml["kind"] == "announcement"
    assert toml["default_segments"] == ["media"]
    assert "event" not in toml
    assert toml["languages"]["es"]["sender_name"] == OBERAXE_ES
    assert toml["languages"]["en"]["sender_name"] == OBERAXE_EN


def test_nothing_invented_in_any_template() -> None:
    files = [p for p in TEMPLATES.rglob("*") if p.is_file()]
    files += list(RECIPIENTS.glob("*.csv"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        for phrase in INVENTED:
            assert phrase not in text, f"{path}: {phrase!r}"
    for slug in CAMPAIGNS:
        for lang in LANGUAGES:
            page = (TEMPLATES / slug / f"{lang}.html.j2").read_text(encoding="utf-8")
            assert "rsvp" not in page or slug == INVITATION


# --- the rendered messages: every fact in both languages and both parts ------------------
# These go through `clara-mail import` and `clara-mail preview --recipient`, so they need
# the renderer to give templates `data`, `project`, `footer` and `consent_source`.


MailCli = tuple[CliRunner, dict[str, str], Path]


@pytest.fixture(scope="module")
def mail_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailCli]:
    from clara_mailer.cli import main

    home = tmp_path_factory.mktemp("content")
    env = {
        "CLARA_DATABASE_URL": f"sqlite:///{home / 'clara-mail.db'}",
        "CLARA_SECRET_KEY": "test-secret-key-0123456789abcdef",
        "CLARA_BASE_URL": "https://clara.example",
        "CLARA_OUTBOX_DIR": str(home / "outbox"),
    }
    runner = CliRunner()
    csvs = [str(p) for p in sorted(RECIPIENTS.glob("*.csv"))]
    # In an empty folder: no clara-mail.toml of the developer's is read.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        result = runner.invoke(
            main, ["import", "--create-segments", *csvs], env=env, catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        yield runner, env, home


def run(mail_cli: MailCli, *args: str) -> str:
    from clara_mailer.cli import main

    runner, env, _ = mail_cli
    result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# One registry recipient per campaign and language (their Origen is printed in the footer).
RECIPIENT = {
    (NEWSLETTER, "es"): "contacto@interior.example",
    (NEWSLETTER, "en"): "contacto@enar.example",
    (INVITATION, "es"): "contacto@policia-denia.example",
    (INVITATION, "en"): "contacto@eccar.example",
    (PRESS, "es"): "redaccion@medio-1.example",
    (PRESS, "en"): "newsdesk@media-outlet.example",
}


def from_name(raw: bytes) -> str:
    """The From display name, decoded per RFC 2047 (adjacent encoded-words joined: the
    stdlib's default policy keeps a space between them)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    (value,) = re.findall(r"^From: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M)
    unfolded = re.sub(r"\r\n[ \t]", " ", value)
    ((name, _address),) = getaddresses([str(make_header(decode_header(unfolded)))])
    return name


def rendered(mail_cli: MailCli, slug: str, language: str) -> tuple[EmailMessage, str, str, str]:
    out = mail_cli[2] / f"{slug}.{language}.eml"
    run(mail_cli, "preview", slug, "--recipient", RECIPIENT[slug, language],
        "--format", "eml", "--output", str(out))  # fmt: skip
    raw = out.read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text = html_part = ""
    for part in msg.walk():
        if part.get_content_type() == "text/plain" and not text:
            text = part.get_content()
        elif part.get_content_type() == "text/html" and not html_part:
            html_part = part.get_content()
    assert text and html_part
    return msg, squash(text), squash(html.unescape(html_part)), from_name(raw)


def assert_in_both(facts: list[str], text: str, html_text: str, where: str) -> None:
    for fact in facts:
        assert fact in text, f"{where}: {fact!r} missing from the text part"
        assert fact in html_text, f"{where}: {fact!r} missing from the HTML part"


def shared_facts(language: str) -> list[str]:
    """The footer's facts: co-funding, grant, consortium, website."""
    p = project()
    funding = FUNDING_ES if language == "es" else FUNDING_EN
    partners = PARTNERS_ES if language == "es" else PARTNERS_EN
    return [funding, GRANT, GRANT_AGREEMENT, *partners, *PARTNER_POLICE_CITIES, WEBSITE,
            p["title"][language]]  # fmt: skip


def recipient_source(email_address: str) -> str:
    for path in RECIPIENTS.glob("*.csv"):
        for r in read_rows(path.name):
            if r["Correo electrónico"] == email_address:
                return r["Origen"]
    raise AssertionError(email_address)


@pytest.mark.parametrize("language", LANGUAGES)
def test_newsletter_renders_every_fact(mail_cli: MailCli, language: str) -> None:
    _, text, html_text, sender_name = rendered(mail_cli, NEWSLETTER, language)
    p, d = project(), data(NEWSLETTER)
    fc = p["final_conference"]
    facts = [
        *FIGURES.values(),
        p["bradford"]["police"], p["bradford"]["alliance"], p["bradford"]["city"],
        RESULTS_REPORT_URL, WEBSITE, TWITTER, HASHTAG, fc[f"date_{language}"],
        fc["start"], fc["end"], METHODOLOGY[0], METHODOLOGY[1], COORDINATION,
        "casi 6 minutos" if language == "es" else "almost 6 minutes",
        "más de dos años" if language == "es" else "more than two years",
    ]  # fmt: skip
    facts += [product[language] for product in d["products"]]
    facts += [product[3] for product in PRODUCTS] + [product[2] for product in PRODUCTS]
    facts += [t[language] for t in d["product_types"]]
    facts += [h[language] for h in d["results_report_highlights"]]
    facts += [page[language] for page in d["website_pages"]]
    facts += sorted(CLAP_CITIES)
    facts += shared_facts(language)
    facts.append(recipient_source(RECIPIENT[NEWSLETTER, language]))
    assert_in_both(facts, text, html_text, f"{NEWSLETTER} ({language})")
    sender = OBERAXE_ES if language == "es" else OBERAXE_EN
    assert sender_name == sender
    assert "Estimado/a" not in text and "Dear colleague," not in text


@pytest.mark.parametrize("language", LANGUAGES)
def test_invitation_renders_the_programme(mail_cli: MailCli, language: str) -> None:
    msg, text, html_text, _ = rendered(mail_cli, INVITATION, language)
    d = data(INVITATION)
    facts = [f"{item['start']}–{item['end']}" for item in d["programme"]]
    for item in d["programme"]:
        facts += [item[language], *item[f"speakers_{language}"], *item["cities"]]
    facts += [CONFERENCE_CITY, f"{GUESTS_MORE_THAN}", TWITTER, HASHTAG]
    facts += shared_facts(language)
    facts.append(recipient_source(RECIPIENT[INVITATION, language]))
    assert_in_both(facts, text, html_text, f"{INVITATION} ({language})")
    assert "más de 100 invitados" in text if language == "es" else "more than 100 guests" in text
    # The calendar entry: Madrid only (no venue in the report), 10:30-13:50 Madrid time.
    from icalendar import Calendar

    (cal_part,) = [p for p in msg.walk() if p.get_content_type() == "text/calendar"]
    cal = Calendar.from_ical(cal_part.get_payload(decode=True))
    (event,) = cal.walk("VEVENT")
    assert str(event["LOCATION"]) == CONFERENCE_CITY
    madrid = ZoneInfo("Europe/Madrid")
    assert event.decoded("DTSTART") == dt.datetime(2022, 2, 4, 10, 30, tzinfo=madrid)
    assert event.decoded("DTEND") == dt.datetime(2022, 2, 4, 13, 50, tzinfo=madrid)


@pytest.mark.parametrize("language", LANGUAGES)
def test_press_release_renders_every_fact(mail_cli: MailCli, language: str) -> None:
    msg, text, html_text, sender_name = rendered(mail_cli, PRESS, language)
    p, d = project(), data(PRESS)
    fc = p["final_conference"]
    facts = [
        FIGURES["claps"], FIGURES["police_officers"], FIGURES["community_participants"],
        FIGURES["bradford_officers"], p["bradford"]["police"], fc[f"date_{language}"],
        fc["start"], fc["end"], CONFERENCE_CITY, str(GUESTS_MORE_THAN), RESULTS_REPORT_URL,
        PRESS_RELEASE_PAGE, TWITTER, HASHTAG, str(HATE_CRIME_INCREASE_MORE_THAN),
        fc[f"guests_{language}"],
    ]  # fmt: skip
    for category in d["product_categories"]:
        facts += [category[language], *category["cities"]]
    facts += shared_facts(language)
    facts.append(recipient_source(RECIPIENT[PRESS, language]))
    assert_in_both(facts, text, html_text, f"{PRESS} ({language})")
    assert not any(p.get_content_type() == "text/calendar" for p in msg.walk())
    assert "/r/" not in text  # no RSVP link
    sender = OBERAXE_ES if language == "es" else OBERAXE_EN
    assert sender_name == sender


@pytest.mark.parametrize("slug", CAMPAIGNS)
def test_footer_says_why_and_how_to_object(mail_cli: MailCli, slug: str) -> None:
    for language in LANGUAGES:
        _, text, html_text, _ = rendered(mail_cli, slug, language)
        if language == "es":
            facts = ["interés legítimo", "art. 21 del RGPD", "arts. 15 a 20 del RGPD"]
        else:
            facts = ["legitimate interest", "Article 21 GDPR", "Articles 15 to 20 GDPR"]
        assert_in_both(facts, text, html_text, f"{slug} ({language})")
        assert "https://clara.example/u/" in text and "https://clara.example/u/" in html_text


def test_segments_after_import(mail_cli: MailCli) -> None:
    rows = json.loads(run(mail_cli, "segments", "--format", "json"))
    counts = {row["slug"]: int(row["members"]) for row in rows}
    assert {k: counts[k] for k in SEGMENT_COUNTS} == SEGMENT_COUNTS
    assert counts["city-networks"] == len(CITY_NETWORKS)
    assert counts["media"] == len(read_rows("media.csv"))
