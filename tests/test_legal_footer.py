"""The legal footer from the settings, the warnings of `check` and `send`, the refusal of
SMTP sends while the footer is incomplete, and the `sender_address` setting."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from clara_mailer.cli import main
from clara_mailer.compose.campaigns import list_campaigns, load_campaign
from clara_mailer.compose.render import (
    FOOTER_SETTINGS,
    campaign_warnings,
    message_parts,
    parse_message,
)
from clara_mailer.core.errors import ConfigError, SendError
from clara_mailer.core.settings import Settings, load_settings
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Delivery
from tests.conftest import settings_env
from tests.send_helpers import add_recipients
from tests.smtp_server import RecordingSMTPServer

SLUGS = ("conference-2022-02-04", "newsletter-2022-01", "press-release-2022-02-04")
# Sample values only (the report names no postal address for OBERAXE: nothing shipped
# invents one); each is distinctive enough to be found in a rendered part.
FOOTER = {
    "sender_legal_name": "Remitente de Prueba S.A.",
    "sender_postal_address": "Calle de Prueba 1, 00000 Ciudad de Prueba",
    "controller_contact": "dpd@responsable-prueba.example",
    "privacy_url": "https://privacidad-prueba.example/aviso",
}
# The footer's labels for each setting, per language: printed only with their value.
LABELS = {
    "es": {
        "sender_legal_name": "Remitente y responsable del tratamiento de sus datos:",
        "sender_postal_address": "Dirección postal:",
        "controller_contact": "dirigiéndose al responsable del tratamiento:",
        "privacy_url": "política de privacidad",
    },
    "en": {
        "sender_legal_name": "Sender and controller of your data:",
        "sender_postal_address": "Postal address:",
        "controller_contact": "by contacting the data controller:",
        "privacy_url": "privacy notice",
    },
}
FALLBACK_CONTACT = {"es": "respondiendo a este mensaje", "en": "by replying to this message"}
SAMPLE_SOURCE = {
    "es": "ejemplo: directorio público de la entidad",
    "en": "example: the organisation's public directory",
}
FUTURE = dt.datetime(2022, 1, 20, 9, 0, tzinfo=dt.UTC)  # before the conference
PAST = dt.datetime(2022, 2, 5, 9, 0, tzinfo=dt.UTC)  # the day after


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared test settings with the legal footer and sender_address empty, whatever
    the shared fixture sets: each test fills in what it needs."""
    return _with(settings, **dict.fromkeys(FOOTER_SETTINGS), sender_address=None)


def _with(settings: Settings, **values: Any) -> Settings:
    return dataclasses.replace(settings, **values)


def _filled(settings: Settings, **values: Any) -> Settings:
    return _with(settings, **{**FOOTER, **values})


def _parts(settings: Settings, db: Database, slug: str, language: str) -> tuple[str, str]:
    mailer = Mailer(settings, database=db)
    return message_parts(mailer.preview(slug, language=language, fmt="eml"))


def _invoke(settings: Settings, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        main, list(args), env=settings_env(settings), input=input, catch_exceptions=False
    )


# -- the footer -------------------------------------------------------------------------


@pytest.mark.parametrize("slug", SLUGS)
@pytest.mark.parametrize("language", ["es", "en"])
def test_footer_renders_each_setting_in_both_parts(
    settings: Settings, db: Database, slug: str, language: str
) -> None:
    text, html = _parts(_filled(settings), db, slug, language)
    for part in (text, html):
        for name, value in FOOTER.items():
            assert value in part, (name, language)
            assert LABELS[language][name] in part, (name, language)
        assert FALLBACK_CONTACT[language] not in part
        # Why this address received it: the recipient's consent_source.
        assert SAMPLE_SOURCE[language] in part.replace("&#x27;", "'")
    assert f'href="{FOOTER["privacy_url"]}"' in html
    for other in {"es", "en"} - {language}:  # the other language's labels are not there
        assert LABELS[other]["sender_postal_address"] not in text + html


@pytest.mark.parametrize("slug", SLUGS)
@pytest.mark.parametrize("language", ["es", "en"])
def test_empty_footer_prints_nothing_invented(
    settings: Settings, db: Database, slug: str, language: str
) -> None:
    text, html = _parts(settings, db, slug, language)
    for part in (text, html):
        assert not re.search(r"\bNone\b", part)
        for name, label in LABELS[language].items():
            assert label not in part, name
        assert FALLBACK_CONTACT[language] in part  # how to exercise the rights, still
    assert 'href=""' not in html
    assert "<p></p>" not in html.replace(" ", "").replace("\n", "")


@pytest.mark.parametrize("language", ["es", "en"])
def test_footer_prints_the_settings_given_and_only_their_labels(
    settings: Settings, db: Database, language: str
) -> None:
    partial = _with(settings, sender_legal_name=FOOTER["sender_legal_name"])
    text, html = _parts(partial, db, "newsletter-2022-01", language)
    for part in (text, html):
        assert FOOTER["sender_legal_name"] in part
        assert LABELS[language]["sender_legal_name"] in part
        for name in ("sender_postal_address", "controller_contact", "privacy_url"):
            assert LABELS[language][name] not in part, name
        assert not re.search(r"\bNone\b", part)


# -- check: warnings --------------------------------------------------------------------


def test_warnings_name_each_empty_footer_setting_once(settings: Settings) -> None:
    defn = load_campaign(settings, "newsletter-2022-01")
    warnings = campaign_warnings(settings, defn, FUTURE)
    assert len(warnings) == len(FOOTER_SETTINGS)
    for name, line in zip(FOOTER_SETTINGS, warnings, strict=True):
        assert name in line and f"CLARA_{name.upper()}" in line and "clara-mail.toml" in line
    assert campaign_warnings(_filled(settings), defn, FUTURE) == []
    one_missing = _filled(settings, privacy_url=None)
    [line] = campaign_warnings(one_missing, defn, FUTURE)
    assert line.startswith("setting privacy_url is not set")


def test_invitation_warns_of_venue_and_past_event(settings: Settings) -> None:
    filled = _filled(settings)
    defn = load_campaign(filled, "conference-2022-02-04")
    toml = str(defn.toml_path)
    before = campaign_warnings(filled, defn, FUTURE)
    assert len(before) == 1
    assert before[0].startswith(f"{toml}: [event] venue_name and [event] venue_address")
    assert "venue is not set" in before[0] and "'Madrid'" in before[0]

    after = campaign_warnings(filled, defn, PAST)
    assert after[0] == before[0]
    assert after[1].startswith(f"{toml}: [event] start 2022-02-04 10:30 (Europe/Madrid)")
    assert "in the past" in after[1] and "already taken place" in after[1]

    assert defn.event is not None
    # 11:00 in Madrid is 10:00 UTC: begun, not over.
    during = dt.datetime(2022, 2, 4, 10, 0, tzinfo=dt.UTC)
    assert "already begun" in campaign_warnings(filled, defn, during)[1]

    with_venue = dataclasses.replace(
        defn, event=dataclasses.replace(defn.event, venue_name="Sala", venue_address="Calle 1")
    )
    assert campaign_warnings(filled, with_venue, FUTURE) == []
    name_only = dataclasses.replace(defn, event=dataclasses.replace(defn.event, venue_name="Sala"))
    [line] = campaign_warnings(filled, name_only, FUTURE)
    assert f"{toml}: [event] venue_address is empty" in line


def test_other_campaigns_have_no_event_warnings(settings: Settings) -> None:
    for defn in list_campaigns(settings):
        if defn.slug != "conference-2022-02-04":
            assert campaign_warnings(_filled(settings), defn, PAST) == []


@pytest.mark.parametrize("slug", SLUGS)
def test_check_cli_warns_and_passes(settings: Settings, slug: str) -> None:
    empty = _invoke(settings, "check", slug)
    assert empty.exit_code == 0, empty.output
    assert f"{slug}: OK" in empty.stdout
    lines = empty.stderr.splitlines()
    assert all(line.startswith("Warning: ") for line in lines)
    for name in FOOTER_SETTINGS:
        [line] = [x for x in lines if f"setting {name} is not set" in x]
        assert f"CLARA_{name.upper()}" in line

    filled = _invoke(_filled(settings), "check", slug)
    assert filled.exit_code == 0, filled.output
    assert f"{slug}: OK" in filled.stdout
    assert "Warning: setting" not in filled.stderr
    if slug == "conference-2022-02-04":
        assert "venue is not set" in filled.stderr
        assert "is in the past" in filled.stderr  # today is after 4 February 2022
    else:
        assert filled.stderr == ""


# -- sending: refused over SMTP while the footer is incomplete ------------------------


def _delivery_rows(db: Database) -> tuple[int, int]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(Delivery)) or 0,
            s.scalar(select(func.count()).select_from(Campaign)) or 0,
        )


def test_smtp_send_refused_while_footer_empty_then_sent(settings: Settings, db: Database) -> None:
    addresses = add_recipients(db, 3)
    with RecordingSMTPServer() as server:
        smtp = _with(settings, smtp_url=server.url())
        refused = _invoke(smtp, "send", "newsletter-2022-01", "--segment", "local-police", "--yes")
        assert refused.exit_code == 2, refused.output
        [error] = refused.output.splitlines()  # one line: no warnings, no plan
        assert error.startswith("Error: refusing to send 'newsletter-2022-01' over SMTP")
        for name in FOOTER_SETTINGS:
            assert name in error and f"CLARA_{name.upper()}" in error
        assert server.messages == []
        assert _delivery_rows(db) == (0, 0)  # nothing written either

        # One setting missing is named alone.
        almost = _filled(smtp, controller_contact=None)
        refused = _invoke(almost, "send", "newsletter-2022-01", "--segment", "local-police", "-y")
        assert refused.exit_code == 2
        assert "setting(s) controller_contact is empty" in refused.stderr
        assert "sender_legal_name" not in refused.stderr.splitlines()[-1]
        assert server.messages == [] and _delivery_rows(db) == (0, 0)

        sent = _invoke(
            _filled(smtp), "send", "newsletter-2022-01", "--segment", "local-police", "--yes"
        )
        assert sent.exit_code == 0, sent.output
        assert "3 sent" in sent.stdout
        assert "Warning:" not in sent.stderr
        assert sorted(r for m in server.messages for r in m.recipients) == addresses
    for message in server.messages:
        text, html = message_parts(message.data)
        for value in FOOTER.values():
            assert value in text and value in html


def test_mailer_plan_refused_over_smtp_dry_run_is_not(settings: Settings, db: Database) -> None:
    add_recipients(db, 2)
    smtp = _with(settings, smtp_url="smtp://127.0.0.1:9?tls=none")  # never reached
    options = SendOptions(segments=("local-police",))
    with Mailer(smtp, database=db) as mailer:
        with pytest.raises(SendError, match="sender_postal_address") as caught:
            mailer.plan("newsletter-2022-01", options)
        assert caught.value.exit_code == 2
        assert mailer.dry_run("newsletter-2022-01", options).rendered["local-police"] == 2
    assert _delivery_rows(db) == (0, 0)
    with Mailer(settings, database=db) as mailer:  # to the outbox: no refusal
        assert mailer.plan("newsletter-2022-01", options).added == 2


def test_outbox_send_test_to_and_dry_run_only_warn(settings: Settings, db: Database) -> None:
    add_recipients(db, 2)
    outbox = _invoke(settings, "send", "newsletter-2022-01", "--segment", "local-police", "--yes")
    assert outbox.exit_code == 0, outbox.output
    assert "2 sent" in outbox.stdout
    for name in FOOTER_SETTINGS:
        assert f"Warning: setting {name} is not set" in outbox.stderr
    assert len(list((settings.outbox_dir / "newsletter-2022-01").glob("*.eml"))) == 2

    with RecordingSMTPServer() as server:
        smtp = _with(settings, smtp_url=server.url())
        sample = _invoke(
            smtp, "send", "conference-2022-02-04", "--segment", "local-police", "--test-to",
            "me@clara.example",
        )  # fmt: skip
        assert sample.exit_code == 0, sample.output
        assert "venue is not set" in sample.stderr
        assert "Warning: setting privacy_url is not set" in sample.stderr
        assert len(server.messages) == 2  # es and en
        dry = _invoke(smtp, "send", "newsletter-2022-01", "--segment", "local-police", "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "Warning: setting sender_legal_name is not set" in dry.stderr
        assert len(server.messages) == 2


# -- sender_address ---------------------------------------------------------------------


def test_sender_address_replaces_every_campaigns_sender(settings: Settings) -> None:
    chosen = _with(settings, sender_address="boletin@oberaxe-real.example")
    for slug in SLUGS:
        own = load_campaign(settings, slug)
        defn = load_campaign(chosen, slug)
        assert defn.sender == "boletin@oberaxe-real.example"
        assert defn.sender_domain == "oberaxe-real.example"
        # What the campaign file sets explicitly stays the file's.
        assert (defn.reply_to, defn.unsubscribe_address, defn.list_id) == (
            own.reply_to,
            own.unsubscribe_address,
            own.list_id,
        )


def test_sender_address_reaches_from_message_id_and_envelope(
    settings: Settings, db: Database
) -> None:
    chosen = _with(settings, sender_address="boletin@oberaxe-real.example")
    data = Mailer(chosen, database=db).preview("newsletter-2022-01", language="en", fmt="eml")
    msg = parse_message(data)
    assert msg["From"].addresses[0].addr_spec == "boletin@oberaxe-real.example"
    assert str(msg["Message-ID"]).endswith(".newsletter-2022-01@oberaxe-real.example>")
    with RecordingSMTPServer() as server:
        result = _invoke(
            _with(chosen, smtp_url=server.url()), "send", "newsletter-2022-01",
            "--segment", "local-police", "--test-to", "me@clara.example",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert {m.mail_from for m in server.messages} == {"boletin@oberaxe-real.example"}


def test_sender_address_setting_is_checked(tmp_path: Path) -> None:
    loaded = load_settings(tmp_path, {"CLARA_SENDER_ADDRESS": "boletin@oberaxe-real.example"})
    assert loaded.sender_address == "boletin@oberaxe-real.example"
    with pytest.raises(ConfigError, match="CLARA_SENDER_ADDRESS: sender_address"):
        load_settings(tmp_path, {"CLARA_SENDER_ADDRESS": "not an address"})
    (tmp_path / "clara-mail.toml").write_text('sender_address = ""\n', encoding="utf-8")
    assert load_settings(tmp_path, {}).sender_address is None


def test_non_ascii_sender_address_is_refused_naming_the_setting(settings: Settings) -> None:
    chosen = _with(settings, sender_address="boletín@oberaxe.example")
    with pytest.raises(ConfigError, match="sender_address"):
        load_campaign(chosen, "newsletter-2022-01")
