"""Issue 14 items 15, 22, 23, 24, 11, 12 and 25."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from clara_mailer.core.settings import Settings
from clara_mailer.registry.addresses import AddressError, AddressValidator
from clara_mailer.store.database import Database

Cli = Callable[..., Result]


# --- 15: a 65-character local part; preview of an unknown segment --------------------


@pytest.mark.parametrize(
    "address",
    [
        "x" * 65 + "@b.example",  # ASCII dot-atom: the fast path's shape
        "x" * 30 + "." + "y" * 34 + "@b.example",
        "é" * 65 + "@b.example",  # internationalised: email-validator's path
    ],
)
def test_local_part_over_64_characters_is_refused(address: str) -> None:
    validator = AddressValidator()
    with pytest.raises(AddressError, match="too long before the @-sign"):
        validator.normalise(address)


def test_local_part_of_64_characters_is_accepted() -> None:
    validator = AddressValidator()
    assert validator.normalise("x" * 64 + "@b.example") == "x" * 64 + "@b.example"
    assert validator.normalise("é" * 64 + "@b.example") == "é" * 64 + "@b.example"


def test_preview_of_an_unknown_segment_is_one_line_naming_the_known(cli: Cli) -> None:
    result = cli("preview", "newsletter-2022-01", "--language", "es", "--segment", "nonexistent")
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "nonexistent" in lines[0] and "local-police" in lines[0], lines[0]
    ok = cli("preview", "newsletter-2022-01", "--language", "es", "--segment", "local-police")
    assert ok.exit_code == 0, ok.output


# --- 22: DKIM over-signing ------------------------------------------------------------

DKIM_MESSAGE = (
    b"From: CLARA <news@clara.example>\r\n"
    b"To: Anna <anna@policia.example>\r\n"
    b"Subject: CLARA results\r\n"
    b"Date: Tue, 18 Jan 2022 10:00:00 +0100\r\n"
    b"Message-ID: <n1.42@clara.example>\r\n"
    b"List-Unsubscribe: <https://clara.example/u/abc>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hola Anna,\r\n"
)


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(private key file, the DNS TXT record that publishes the public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "clara.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def _dkim_signed(dkim_keys: tuple[Path, bytes]) -> tuple[bytes, Callable[[bytes], bool]]:
    import dkim

    from tests.test_dkim import dns_for, signer_for

    key_file, record = dkim_keys
    signed = signer_for(key_file).sign(DKIM_MESSAGE)

    def verify(data: bytes) -> bool:
        return bool(dkim.verify(data, dnsfunc=dns_for(record)))

    return signed, verify


def test_dkim_over_signs_and_signs_reply_to(dkim_keys: tuple[Path, bytes]) -> None:
    signed, verify = _dkim_signed(dkim_keys)
    assert verify(signed)
    header = signed[: len(signed) - len(DKIM_MESSAGE)].decode()
    names = header.replace("\r\n", "").replace(" ", "").split("h=")[1].split(";")[0].split(":")
    for name in ("from", "subject", "list-unsubscribe", "list-unsubscribe-post"):
        assert names.count(name) == 2, names
    assert "reply-to" in names


@pytest.mark.parametrize(
    "added",
    [
        b"Subject: Urgent: confirm your password\r\n",
        b"From: Bank <ceo@evil.example>\r\n",
        b"List-Unsubscribe: <https://evil.example/u>\r\n",
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        b"Reply-To: evil@evil.example\r\n",
    ],
)
def test_dkim_header_added_on_top_breaks_the_signature(
    dkim_keys: tuple[Path, bytes], added: bytes
) -> None:
    signed, verify = _dkim_signed(dkim_keys)
    assert verify(signed)
    assert not verify(added + signed)
    _sig, _sep, rest = signed.partition(b"\r\nFrom:")
    assert not verify(_sig + b"\r\n" + added + b"From:" + rest)  # just below the signature


# --- 23: a two-rule VTIMEZONE, DST onset at 02:00, the calendar part inline ----------


def _invitation(*, reference: bool = False) -> bytes:
    from clara_mailer.compose.campaigns import load_campaign
    from clara_mailer.compose.render import RecipientView, Renderer
    from clara_mailer.core.resources import EMAIL_TEMPLATES
    from clara_mailer.core.settings import Settings
    from clara_mailer.core.tokens import TokenSigner

    settings = Settings(
        secret_key="test-secret-key-0123456789abcdef",
        base_url="https://clara.example",
        templates_dir=EMAIL_TEMPLATES,
    )
    signer = TokenSigner("test-secret-key-0123456789abcdef")
    renderer = Renderer(load_campaign(settings, "conference-2022-02-04"), settings, signer, 12)
    rv = RecipientView(
        7, "ines@policia-getafe.example", "Inés", "Policía Local", "es", "local-police"
    )
    return renderer.render_reference(rv) if reference else renderer.render(rv)


@pytest.mark.parametrize("reference", [False, True])
def test_calendar_part_is_inline_with_a_two_rule_vtimezone(reference: bool) -> None:
    import datetime as dt

    from icalendar import Calendar

    from clara_mailer.compose.render import parse_message

    msg = parse_message(_invitation(reference=reference))
    (part,) = [p for p in msg.walk() if p.get_content_type() == "text/calendar"]
    assert part.get_content_disposition() == "inline"
    assert part.get_filename() == "invite.ics"
    raw = part.get_payload(decode=True)
    assert b"RDATE" not in raw
    cal = Calendar.from_ical(raw)
    (tz,) = cal.walk("VTIMEZONE")
    assert str(tz["TZID"]) == "Europe/Madrid"
    (standard,) = tz.walk("STANDARD")
    (daylight,) = tz.walk("DAYLIGHT")
    for sub in (standard, daylight):
        assert "RRULE" in sub and "RDATE" not in sub
        assert sub["RRULE"]["FREQ"] == ["YEARLY"] and sub["RRULE"]["BYDAY"] == ["-1SU"]
    assert daylight["RRULE"]["BYMONTH"] == [3] and standard["RRULE"]["BYMONTH"] == [10]
    assert daylight.decoded("DTSTART").time() == dt.time(2, 0)
    assert standard.decoded("DTSTART").time() == dt.time(3, 0)
    assert daylight.decoded("TZOFFSETFROM") == dt.timedelta(hours=1)
    assert daylight.decoded("TZOFFSETTO") == dt.timedelta(hours=2)
    assert standard.decoded("TZOFFSETFROM") == dt.timedelta(hours=2)
    assert standard.decoded("TZOFFSETTO") == dt.timedelta(hours=1)
    (event,) = cal.walk("VEVENT")
    assert event["DTSTART"].params["TZID"] == "Europe/Madrid"


@pytest.mark.parametrize(
    ("zone", "daylight_rule", "daylight_start", "standard_rule", "standard_start"),
    [
        ("America/New_York", ("2SU", 3), "02:00", ("1SU", 11), "02:00"),
        ("Australia/Sydney", ("1SU", 10), "02:00", ("1SU", 4), "03:00"),
        ("Europe/London", ("-1SU", 3), "01:00", ("-1SU", 10), "02:00"),
    ],
)
def test_vtimezone_rules_come_from_zoneinfo(
    zone: str,
    daylight_rule: tuple[str, int],
    daylight_start: str,
    standard_rule: tuple[str, int],
    standard_start: str,
) -> None:
    from zoneinfo import ZoneInfo

    from icalendar import Timezone

    from clara_mailer.compose.ics import vtimezone

    tz = Timezone.from_ical(vtimezone(ZoneInfo(zone), 2022).to_ical())
    for name, (byday, month), start in (
        ("DAYLIGHT", daylight_rule, daylight_start),
        ("STANDARD", standard_rule, standard_start),
    ):
        (sub,) = tz.walk(name)
        assert sub["RRULE"]["BYDAY"] == [byday] and sub["RRULE"]["BYMONTH"] == [month]
        assert sub.decoded("DTSTART").strftime("%H:%M") == start


def test_vtimezone_without_dst_is_one_standard_observance() -> None:
    from zoneinfo import ZoneInfo

    from clara_mailer.compose.ics import vtimezone

    tz = vtimezone(ZoneInfo("Asia/Tokyo"), 2022)
    assert not tz.walk("DAYLIGHT")
    (standard,) = tz.walk("STANDARD")
    assert "RRULE" not in standard and str(standard["TZNAME"]) == "JST"


# --- 24: a forged VERP token never suppresses ----------------------------------------


def _dsn(to: str, address: str, message_id: str) -> bytes:
    """A hard (5.1.1) DSN addressed to ``to`` about ``address``, returning ``message_id``."""
    return (
        "Return-Path: <>\n"
        f"Delivered-To: {to}\n"
        "Date: Tue, 25 Jan 2022 10:42:11 +0100\n"
        "From: MAILER-DAEMON@mail.attacker.example (Mail Delivery System)\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        f"To: {to}\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n'
        f"Message-Id: <dsn.{to.replace('@', '.')}@attacker.example>\n"
        "\n"
        "--B\n"
        "Content-Type: text/plain\n"
        "\n"
        f"<{address}>: 550 5.1.1 User unknown\n"
        "\n"
        "--B\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mail.attacker.example\n"
        "\n"
        f"Final-Recipient: rfc822; {address}\n"
        "Action: failed\n"
        "Status: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{address}>: User unknown\n"
        "\n"
        "--B\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        f"Message-ID: {message_id}\n"
        f"To: {address}\n"
        "\n"
        "--B--\n"
    ).encode()


@pytest.mark.parametrize(
    "token",
    [
        "aeaw3ifmhm2eu5c23jpp2dl4fdrkv",  # the sample's own token, last character altered
        "aeaw3ifmhm2eu5c23jpp2dl4fdrku".upper()[:-1] + "A",  # upper-cased on the way back
        "ae" + "b" * 27,  # invented outright
        "aezaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",  # longer, still token-shaped
    ],
)
def test_forged_verp_token_never_matches_nor_suppresses(
    db: Database, settings: Settings, tmp_path: Path, token: str
) -> None:
    from clara_mailer.bounces import BounceSource
    from clara_mailer.mailer import Mailer
    from tests.bounces_helpers import delivery_status, seed, suppression_reasons, write_mbox

    seed(db)
    raw = _dsn(
        f"bounces+{token}@clara.example",
        "lost.user@policia-local.example",
        "<newsletter-2022-01.r1@clara.example>",  # the real Message-ID: no fallback to it
    )
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "forged.mbox", [raw])))
    )
    assert (report.hard, report.matched, report.suppressed) == (1, 0, 0)
    assert report.matched_by == {}
    assert [u.address for u in report.unmatched] == ["lost.user@policia-local.example"]
    assert delivery_status(db)[1] == "sent" and suppression_reasons(db) == []


def test_forged_token_in_a_real_sample_is_not_matched_by_address(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    from clara_mailer.bounces import BounceSource
    from clara_mailer.mailer import Mailer
    from tests.bounces_helpers import delivery_status, sample, seed, write_mbox

    seed(db)
    raw = sample("postfix-5.1.1.eml").replace(
        b"aeaw3ifmhm2eu5c23jpp2dl4fdrku", b"aeaw3ifmhm2eu5c23jpp2dl4fdrkv"
    )
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "f.mbox", [raw])))
    )
    assert (report.matched, report.suppressed) == (0, 0)
    assert delivery_status(db)[1] == "sent"


@pytest.mark.parametrize("to", ["bounces@clara.example", "bounces+lists@clara.example"])
def test_bounce_without_a_token_still_matches_by_address(
    db: Database, settings: Settings, tmp_path: Path, to: str
) -> None:
    from clara_mailer.bounces import BounceSource
    from clara_mailer.mailer import Mailer
    from tests.bounces_helpers import seed, suppression_reasons, write_mbox

    seed(db)
    raw = _dsn(to, "lost.user@policia-local.example", "<unknown@elsewhere.example>")
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "plain.mbox", [raw])))
    )
    assert report.matched_by == {"address": 1} and report.suppressed == 1
    assert suppression_reasons(db) == ["hard-bounce"]


# --- 11: db copy from a SQLite file that does not exist ------------------------------


def test_db_copy_from_a_missing_sqlite_file_creates_nothing(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "target.db"
    for missing in (tmp_path / "typo.db", tmp_path / "no-such-dir" / "typo.db"):
        result = cli("db", "copy", f"sqlite:///{target}", "--from", f"sqlite:///{missing}")
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(missing) in lines[0], result.output
        assert "does not exist" in lines[0] and "Copied" not in result.output
        assert not missing.exists() and not missing.parent.joinpath("typo.db").exists()
        assert not (tmp_path / "no-such-dir").exists()
        assert not target.exists()


def test_db_copy_from_an_existing_sqlite_file_still_copies(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    if db.dialect != "sqlite":
        pytest.skip("the source is PostgreSQL")
    target = tmp_path / "copy.db"
    result = cli("db", "copy", f"sqlite:///{target}", "--from", db.url)
    assert result.exit_code == 0, result.output
    assert "Copied" in result.output and target.is_file()


# --- 12: several files, one unreadable ------------------------------------------------

IMPORT_HEADER = "email,name,organisation,segment,language\n"


def test_import_finishes_the_other_files_and_names_the_unreadable_one(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    from tests.registry_helpers import registry_state

    (tmp_path / "a.csv").write_text(
        IMPORT_HEADER + "ana@policia-a.example,Ana,Policía A,local-police,es\n"
    )
    mixed = (
        IMPORT_HEADER.encode()
        + "jose@x.example,José,Accem,associations,es\n".encode()
        + "maria@x.example,María,Accem,associations,es\n".encode("cp1252")
    )
    (tmp_path / "b-mixed.csv").write_bytes(mixed)
    (tmp_path / "c.csv").write_text(
        IMPORT_HEADER + "carla@policia-c.example,Carla,Policía C,local-police,es\n"
    )
    result = cli("import", "a.csv", "b-mixed.csv", "c.csv")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith("Error")] == [
        "a.csv",
        "c.csv",
    ], result.output
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: b-mixed.csv:"), result.output
    emails = {row[0] for row in registry_state(db)["recipients"]}
    assert {"ana@policia-a.example", "carla@policia-c.example"} <= emails
    assert not {"jose@x.example", "maria@x.example"} & emails


def test_import_names_each_of_several_unreadable_files(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    from tests.registry_helpers import registry_state

    (tmp_path / "good.csv").write_text(
        IMPORT_HEADER + "ana@policia-a.example,Ana,Policía A,local-police,es\n"
    )
    (tmp_path / "image.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    result = cli("import", "missing.csv", "good.csv", "image.csv")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 2, result.output
    assert "missing.csv" in errors[0] and "image.csv" in errors[1], result.output
    assert any(line.startswith("good.csv: 1 rows") for line in result.output.splitlines())
    assert "ana@policia-a.example" in {row[0] for row in registry_state(db)["recipients"]}


# --- 25: small things -----------------------------------------------------------------


def test_long_slug_is_never_truncated_in_a_table() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from clara_mailer.cli.app import print_rows

    slug = "conference-2022-02-04-second-edition-with-a-long-name-of-the-venue-x"
    out = io.StringIO()
    app = SimpleNamespace(out=Console(file=out, width=80, color_system=None))
    rows = [{"slug": slug, "kind": "invitation", "languages": "es, en", "subject": "A long " * 8}]
    print_rows(app, rows, ["slug", "kind", "languages", "subject"], "table")  # type: ignore[arg-type]
    assert slug in out.getvalue(), out.getvalue()


def test_one_rsvp_is_one_answer(db: Database, settings: Settings, cli: Cli) -> None:
    from sqlalchemy import delete, select

    from clara_mailer.store.models import Rsvp
    from tests.report_helpers import INVITATION, build_invitation_log

    build_invitation_log(db, settings)
    with db.session() as s:
        keep = s.scalars(select(Rsvp.id).order_by(Rsvp.id)).first()
        s.execute(delete(Rsvp).where(Rsvp.id != keep))
    output = cli("report", INVITATION).stdout
    assert "(1 answer)" in output and "(1 answers)" not in output, output


def test_db_help_has_an_example_and_recipients_show_documents_format(cli: Cli) -> None:
    assert "Example" in cli("db", "--help").output
    show = cli("recipients", "show", "--help").output
    assert "--format" in show and "JSON" in show
    assert "Output format" in cli("optout", "list", "--help").output
