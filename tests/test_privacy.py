"""GDPR erase and export, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import String, Text, func, inspect, select, text

from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.optouts.suppressions import active_suppressions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery, Recipient, Rsvp, Suppression, recipient_segments
from tests.optout_seed import ANA, JOHN, Seeded

Cli = Callable[..., Result]


def every_text_value(db: Database) -> list[tuple[str, str, str]]:
    """(table, column, value) for every string cell of every table in the database."""
    inspector = inspect(db.engine)
    # Columns first: on SQLite every transaction takes the write lock (db.py), so the
    # inspector must not run while the reading connection is open.
    text_columns = [
        (table, column["name"])
        for table in inspector.get_table_names()
        for column in inspector.get_columns(table)
        if isinstance(column["type"], String | Text)
    ]
    assert len(text_columns) > 20  # the scan sees the whole schema
    found = []
    with db.engine.connect() as conn:
        for table, name in text_columns:
            query = text(f'SELECT "{name}" FROM "{table}" WHERE "{name}" IS NOT NULL')
            found += [(table, name, str(value)) for (value,) in conn.execute(query)]
    return found


def readable_traces(db: Database, needles: list[str]) -> list[tuple[str, str, str]]:
    needles = [n.casefold() for n in needles]
    return [
        cell
        for cell in every_text_value(db)
        if any(needle in cell[2].casefold() for needle in needles)
    ]


ANA_TRACES = [
    "ana.perez",
    "Ana Pérez",
    "Núñez",
    "Policía Local de Getafe",
    "CLARA partner list 2021",
]


def test_erase_leaves_nothing_readable_and_keeps_a_keyed_hash(
    cli: Cli, db: Database, signer: TokenSigner, seeded: Seeded
) -> None:
    # The scan finds the seeded data first: it can fail.
    assert {t for t, _, _ in readable_traces(db, ANA_TRACES)} >= {
        "recipients",
        "deliveries",
        "bounces",
    }

    result = cli("recipients", "erase", ANA.upper(), "--yes")
    assert result.exit_code == 0, result.output
    assert "profile deleted" in result.output
    assert "2 segment membership(s), 1 RSVP(s) removed" in result.output
    assert "address blanked in 2 delivery row(s)" in result.output

    assert readable_traces(db, ANA_TRACES) == []
    with db.session() as s:
        assert s.get(Recipient, seeded.ana_id) is None
        assert s.scalar(select(func.count()).select_from(Delivery)) == 6  # figures stay
        blanked = s.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.email.is_(None), Delivery.recipient_id.is_(None))
        )
        assert blanked == 2
        assert s.scalar(select(func.count()).select_from(Rsvp)) == 0
        members = select(func.count()).select_from(recipient_segments)
        assert s.scalar(members.where(recipient_segments.c.recipient_id == seeded.ana_id)) == 0
        assert active_suppressions(s, [signer.address_hash(ANA)]) == {
            signer.address_hash(ANA): "erased"
        }
        # Nobody else was touched.
        john = s.get(Recipient, seeded.john_id)
        assert john is not None and john.email == JOHN
        assert [seg.slug for seg in john.segments] == ["national-authorities"]
    assert readable_traces(db, [JOHN, "John Smith"]) != []


def test_erased_address_cannot_be_imported_again(
    cli: Cli, db: Database, tmp_path: Path, seeded: Seeded
) -> None:
    assert cli("recipients", "erase", ANA, "--yes").exit_code == 0
    registry = tmp_path / "registry.csv"
    registry.write_text(
        "email,name,organisation,segment,language\n"
        f"{ANA.lower()},Ana Pérez Núñez,Policía Local de Getafe,local-police,es\n"
        "nueva@policia-pamplona.example,Nerea Iriarte,Policía Municipal de Pamplona,"
        "local-police,es\n",
        encoding="utf-8",
    )
    result = cli("import", str(registry))
    assert result.exit_code == 1, result.output  # one row rejected
    assert "registry.csv:2:" in result.output
    assert "erased" in result.output
    with db.session() as s:
        keys = set(s.scalars(select(Recipient.email_key)))
    assert ANA.casefold() not in keys
    assert "nueva@policia-pamplona.example" in keys
    # The refused row left nothing readable in the database either.
    assert readable_traces(db, ANA_TRACES) == []


def test_erase_asks_first(cli: Cli, db: Database, seeded: Seeded) -> None:
    before = every_text_value(db)
    result = cli("recipients", "erase", ANA, input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert every_text_value(db) == before


def test_erase_of_an_unknown_address_still_blocks_it(
    db: Database, settings: Settings, signer: TokenSigner, seeded: Seeded
) -> None:
    done = Mailer(settings, database=db).erase("nadie@ayuntamiento-leganes.example")
    assert not done.recipient_found and done.deliveries == 0
    with db.session() as s:
        hashes = [signer.address_hash("nadie@ayuntamiento-leganes.example")]
        assert active_suppressions(s, hashes) == {hashes[0]: "erased"}
    with pytest.raises(InputError, match="not an email address"):
        Mailer(settings, database=db).erase("   ")


def test_export_data_holds_everything_about_one_address(cli: Cli, seeded: Seeded) -> None:
    cli("optout", "add", ANA, "--scope", "invitation")
    result = cli("recipients", "export-data", ANA.lower())
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["profile"]["email"] == ANA
    assert data["profile"]["name"] == "Ana Pérez Núñez"
    assert data["consent"] == {
        "basis": "legitimate-interest",
        "source": "CLARA partner list 2021",
    }
    assert data["segments"] == ["local-police", "national-authorities"]
    assert sorted(d["campaign"] for d in data["deliveries"]) == [
        "final-conference",
        "newsletter-2022-01",
    ]
    assert [(o["reason"], o["scope"]) for o in data["opt_outs"]] == [("manual", "invitation")]
    assert [(r["campaign"], r["answer"]) for r in data["rsvps"]] == [("final-conference", "yes")]
    assert [(b["status"], b["campaign"]) for b in data["bounces"]] == [
        ("4.2.2", "newsletter-2022-01")
    ]
    assert "John" not in result.output


def test_export_after_erasure_shows_only_the_suppression(
    db: Database, settings: Settings, seeded: Seeded
) -> None:
    Mailer(settings, database=db).erase(ANA)
    data = Mailer(settings, database=db).export_data(ANA)
    assert data["profile"] is None and data["deliveries"] == [] and data["rsvps"] == []
    assert [o["reason"] for o in data["opt_outs"]] == ["erased"]
    assert data["bounces"] and all("ana" not in b["diagnostic"].lower() for b in data["bounces"])


def test_export_of_an_unknown_address_is_one_line(cli: Cli, seeded: Seeded) -> None:
    result = cli("recipients", "export-data", "nadie@ayuntamiento-leganes.example")
    assert result.exit_code == 1
    assert (
        result.output.strip() == "Error: nothing is held about nadie@ayuntamiento-leganes.example"
    )


def test_export_refuses_unknown_and_bad_addresses(
    db: Database, settings: Settings, seeded: Seeded
) -> None:
    with pytest.raises(NotFound):
        Mailer(settings, database=db).export_data("nadie@ayuntamiento-leganes.example")
    with pytest.raises(InputError):
        Mailer(settings, database=db).export_data("no-address")


def test_suppression_rows_hold_no_address(cli: Cli, db: Database, seeded: Seeded) -> None:
    cli("optout", "add", ANA, "--reason", f"asked by {ANA} on the phone")
    cli("recipients", "erase", ANA, "--yes")
    with db.session() as s:
        notes = list(s.scalars(select(Suppression.note)))
    assert notes and all("ana.perez" not in n.lower() for n in notes)
    assert readable_traces(db, ["ana.perez"]) == []
