"""The registry: ``segments``, ``recipients list`` / ``show``, and the address fast path."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from email_validator import EmailNotValidError, validate_email

from clara_mailer.registry.addresses import AddressError, AddressValidator

from .registry_helpers import write

Cli = Callable[..., Result]

SAMPLE = (
    "correo;nombre;entidad;segmento;idioma\n"
    "ana@policia-elche.example;Ana Pérez;Policía Local de Elche;local-police;es\n"
    "john@oberaxe.example;John Smith;OBERAXE;national-authorities|associations;en\n"
    'zoe@asso.example;=HYPERLINK("http://x.example");+Asso;associations;es\n'
)


@pytest.fixture
def imported(cli: Cli, tmp_path: Path) -> None:
    result = cli("import", str(write(tmp_path, "sample.csv", SAMPLE)))
    assert result.exit_code == 0, result.output


def test_segments_lists_member_counts(cli: Cli, imported: None) -> None:
    result = cli("segments", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.output) == [
        {"slug": "associations", "name": "Associations and social entities", "members": 2},
        {
            "slug": "city-networks",
            "name": "European networks against racism (ENAR, ECCAR)",
            "members": 0,
        },
        {"slug": "local-police", "name": "Local police forces", "members": 1},
        {"slug": "media", "name": "Media and press offices", "members": 0},
        {"slug": "national-authorities", "name": "National authorities", "members": 1},
    ]
    table = cli("segments")
    assert "Local police forces" in table.output and "national-authorities" in table.output


def test_recipients_list_formats_and_segment_filter(cli: Cli, imported: None) -> None:
    data = json.loads(cli("recipients", "list", "--format", "json").output)
    assert [r["email"] for r in data] == [
        "ana@policia-elche.example",
        "john@oberaxe.example",
        "zoe@asso.example",
    ]
    assert data[1]["segments"] == "associations;national-authorities"
    assert data[1]["language"] == "en"

    police = json.loads(
        cli("recipients", "list", "--segment", "local-police", "--format", "json").output
    )
    assert [r["name"] for r in police] == ["Ana Pérez"]

    # CSV output cannot run formulas in a spreadsheet.
    out = cli("recipients", "list", "--segment", "associations", "--format", "csv").output
    rows = list(csv.DictReader(io.StringIO(out)))
    zoe = next(r for r in rows if r["email"] == "zoe@asso.example")
    assert zoe["name"] == '\'=HYPERLINK("http://x.example")'
    assert zoe["organisation"] == "'+Asso"

    table = cli("recipients", "list")
    assert table.exit_code == 0 and "3 recipient(s)" in table.output


def test_recipients_list_unknown_segment(cli: Cli, imported: None) -> None:
    result = cli("recipients", "list", "--segment", "nope")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: no segment 'nope' (known: associations, city-networks, local-police, media, "
        "national-authorities)"
    )


def test_recipients_show(cli: Cli, imported: None) -> None:
    result = cli("recipients", "show", "JOHN@Oberaxe.example", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["email"] == "john@oberaxe.example"
    assert data["organisation"] == "OBERAXE"
    assert data["segments"] == "associations;national-authorities"
    assert data["consent_source"] == "import of sample.csv"
    text = cli("recipients", "show", "ana@policia-elche.example").output
    assert "organisation: Policía Local de Elche" in text


def test_recipients_show_unknown_address(cli: Cli, imported: None) -> None:
    result = cli("recipients", "show", "nobody@asso.example")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no recipient 'nobody@asso.example' in the registry"


def test_help_texts_have_examples(cli: Cli) -> None:
    for args in (["import"], ["segments"], ["recipients", "list"], ["recipients", "show"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0 and "Example" in result.output, args


# --- the address fast path equals email-validator -------------------------------------


def reference(address: str) -> str:
    """email-validator's verdict (strict: a local part of at most 64 octets, RFC 5321) on
    the address with surrounding spaces trimmed."""
    try:
        return validate_email(address.strip(), check_deliverability=False, strict=True).normalized
    except EmailNotValidError as exc:
        return f"error: {exc}"


def fast(validator: AddressValidator, address: str) -> str:
    try:
        return validator.normalise(address)
    except AddressError as exc:
        return f"error: {exc}"


EDGE_CASES = [
    "a@b.example",
    "A.B@EXAMPLE.ORG",
    ".a@b.example",
    "a.@b.example",
    "a..b@b.example",
    "a@b..example",
    "a@-b.example",
    "a@b-.example",
    "a@b.example.",
    "a@.b.example",
    "a@b",
    "a@localhost",
    "a@x.local",
    "a@x.test",
    "a@x.invalid",
    "a@x.onion",
    "a@10.in-addr.arpa",
    "a@x.123",
    "a@xn--nda-5qa.example",
    "a@xn--zz.example",
    "a@ab--cd.example",
    "a@ñandú.example",
    "ñ@b.example",
    '"quoted"@b.example',
    "a b@b.example",
    "a@b c.example",
    "a@[127.0.0.1]",
    "Name <a@b.example>",
    "a@@b.example",
    "@b.example",
    "a@",
    "",
    "   padded@b.example  ",
    "x" * 64 + "@b.example",
    "x" * 65 + "@b.example",
    "a@" + ".".join(["x" * 63] * 3) + ".example",
    "x" * 60 + "@" + ".".join(["y" * 60] * 3) + ".example",
    "a@" + "x" * 64 + ".example",
    "!#$%&'*+/=?^_`{|}~-@b.example",
    "a@B.EXAMPLE",
    "a@b_c.example",
    "user+tag@sub.domain.example",
]


def test_fast_path_equals_email_validator_on_edge_cases() -> None:
    validator = AddressValidator()
    for address in EDGE_CASES * 2:  # twice: the second time the domain cache answers
        assert fast(validator, address) == reference(address), address


def test_fast_path_equals_email_validator_on_random_addresses() -> None:
    rng = random.Random(5322)
    local_chars = "abcXYZ019.+-_!#'=?~\"(), é@"
    domain_chars = "abcXYZ019.-_ ñ"
    tlds = ["example", "EXAMPLE", "org", "local", "test", "arpa", "123", "x", "xn--p1ai", ""]
    domains = [
        "".join(rng.choice(domain_chars) for _ in range(rng.randint(0, 12)))
        + "."
        + rng.choice(tlds)
        for _ in range(300)
    ]
    validator = AddressValidator(cache_size=100)  # small: the cache is also cleared
    checked = 0
    for _ in range(20_000):
        local = "".join(rng.choice(local_chars) for _ in range(rng.randint(0, 70)))
        domain = rng.choice(domains)
        address = f"{local}@{domain}"
        assert fast(validator, address) == reference(address), address
        checked += 1
    assert checked == 20_000
