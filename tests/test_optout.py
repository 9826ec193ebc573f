"""Opt-outs: the suppressions library and ``clara-mail optout``, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable

import pytest
from click.testing import Result
from sqlalchemy import select

from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.optouts import suppressions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Suppression

Cli = Callable[..., Result]
ADDRESS = "Luis.Garcia@policia-elche.example"


def rows_for(db: Database, signer: TokenSigner, address: str) -> list[Suppression]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Suppression)
                .where(Suppression.address_hash == signer.address_hash(address))
                .order_by(Suppression.id)
            )
        )


def test_add_is_case_insensitive_and_idempotent(db: Database, signer: TokenSigner) -> None:
    with db.session() as s:
        first, new = suppressions.add(s, signer, ADDRESS, note="asked by phone")
        assert new and first.reason == "manual" and first.scope == "all"
    with db.session() as s:
        again, new = suppressions.add(s, signer, ADDRESS.upper())
        assert not new and again.id == first.id
    with db.session() as s:
        found = suppressions.active_suppressions(s, [signer.address_hash(ADDRESS.lower())])
    assert found == {signer.address_hash(ADDRESS): "manual"}


def test_scope_limits_what_is_suppressed(db: Database, signer: TokenSigner) -> None:
    address_hash = signer.address_hash(ADDRESS)
    with db.session() as s:
        suppressions.add(s, signer, ADDRESS, scope="newsletter")
    with db.session() as s:
        assert suppressions.active_suppressions(s, [address_hash], "newsletter") == {
            address_hash: "manual"
        }
        assert suppressions.active_suppressions(s, [address_hash], "invitation") == {}


def test_add_refuses_bad_input(db: Database, signer: TokenSigner) -> None:
    with db.session() as s, pytest.raises(InputError, match="unknown scope"):
        suppressions.add(s, signer, ADDRESS, scope="everything")
    with db.session() as s, pytest.raises(InputError, match="not an email address"):
        suppressions.add(s, signer, "nobody")
    assert suppressions_count(db) == 0


def suppressions_count(db: Database) -> int:
    with db.session() as s:
        return len(list(s.scalars(select(Suppression.id))))


def test_lift_keeps_the_row_and_records_when(db: Database, signer: TokenSigner) -> None:
    with db.session() as s:
        suppressions.add(s, signer, ADDRESS)
    with db.session() as s:
        lifted = suppressions.lift(s, signer, ADDRESS, note="asked to come back")
        assert [r.reason for r in lifted] == ["manual"]
    [row] = rows_for(db, signer, ADDRESS)
    assert row.lifted_at is not None and row.lifted_note == "asked to come back"
    with db.session() as s:
        assert suppressions.active_suppressions(s, [row.address_hash]) == {}
        with pytest.raises(NotFound, match="no active suppression"):
            suppressions.lift(s, signer, ADDRESS)


def test_record_erasure_adds_an_erased_row_beside_an_opt_out(
    db: Database, signer: TokenSigner
) -> None:
    address_hash = signer.address_hash(ADDRESS)
    with db.session() as s:
        suppressions.add(s, signer, ADDRESS, reason="unsubscribe")
        suppressions.record_erasure(s, address_hash)
        suppressions.record_erasure(s, address_hash)
    assert sorted(r.reason for r in rows_for(db, signer, ADDRESS)) == ["erased", "unsubscribe"]


def test_cli_add_list_remove(cli: Cli, db: Database, signer: TokenSigner) -> None:
    added = cli("optout", "add", ADDRESS, "--scope", "newsletter", "--reason", "asked by phone")
    assert added.exit_code == 0, added.output
    assert "suppressed (scope newsletter" in added.output
    again = cli("optout", "add", ADDRESS.lower(), "--scope", "newsletter")
    assert again.exit_code == 0 and "already suppressed" in again.output
    complaint = cli("optout", "add", "queja@oberaxe.example", "--reason", "complaint")
    assert complaint.exit_code == 0

    listed = cli("optout", "list", "--format", "json")
    assert listed.exit_code == 0
    rows = json.loads(listed.output)
    assert [(r["reason"], r["scope"], r["note"]) for r in rows] == [
        ("manual", "newsletter", "asked by phone"),
        ("complaint", "all", ""),
    ]
    assert rows[0]["address_hash"] == signer.address_hash(ADDRESS)
    assert "policia-elche" not in listed.output  # only keyed hashes are stored

    as_csv = cli("optout", "list", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [r["reason"] for r in table] == ["manual", "complaint"]
    assert cli("optout", "list").exit_code == 0

    refused = cli("optout", "remove", ADDRESS, input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert rows_for(db, signer, ADDRESS)[0].lifted_at is None

    removed = cli("optout", "remove", ADDRESS, "--yes")
    assert removed.exit_code == 0
    assert "lifted 1 suppression(s): manual (newsletter)" in removed.output
    [row] = rows_for(db, signer, ADDRESS)
    assert row.lifted_at is not None

    lifted = json.loads(cli("optout", "list", "--format", "json").output)
    assert lifted[0]["lifted_at"] is not None and lifted[1]["lifted_at"] is None


def test_cli_errors_are_one_line(cli: Cli) -> None:
    missing = cli("optout", "remove", "nobody@nowhere.example", "--yes")
    assert missing.exit_code == 1
    assert missing.output.strip() == "Error: no active suppression for nobody@nowhere.example"
    bad = cli("optout", "add", "not-an-address")
    assert bad.exit_code == 2
    assert bad.output.strip() == "Error: not an email address: 'not-an-address'"
    scope = cli("optout", "add", ADDRESS, "--scope", "everything")
    assert scope.exit_code == 2 and "Traceback" not in scope.output


def test_help_has_examples(cli: Cli) -> None:
    for command in (
        ["optout"],
        ["optout", "add"],
        ["optout", "list"],
        ["optout", "remove"],
        ["serve"],
        ["recipients", "erase"],
        ["recipients", "export-data"],
    ):
        result = cli(*command, "--help")
        assert result.exit_code == 0
        assert "Example: clara-mail" in result.output, command
