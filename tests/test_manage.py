"""Recipients and segments one at a time: add, edit, remove (not an erasure), and segments
create, rename, delete (never touching deliveries)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from click.testing import Result
from sqlalchemy import func, select

from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery, Recipient, Segment, Suppression

Cli = Callable[..., Result]
ANA = "ana@policia-getafe.example"


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_add_edit_and_show_a_recipient(cli: Cli, db: Database) -> None:
    out = ok(
        cli(
            "recipients", "add", ANA, "--name", "Ana Pérez", "--organisation",
            "Policía Local de Getafe", "--segment", "local-police", "--language", "es",
        )
    )  # fmt: skip
    assert f"{ANA}: added; segments local-police" in out
    shown = ok(cli("recipients", "show", ANA))
    assert "name: Ana Pérez" in shown and "consent source: added by hand" in shown
    assert ANA in ok(cli("recipients", "list", "--segment", "local-police", "--format", "csv"))

    out = ok(
        cli(
            "recipients", "edit", "ANA@Policia-Getafe.example", "--organisation", "",
            "--segment", "media", "--remove-segment", "local-police", "--language", "en",
        )
    )  # fmt: skip
    assert "segments media, language en" in out and "organisation (none)" in out
    with db.session() as s:
        ana = s.scalars(select(Recipient)).one()
        assert [seg.slug for seg in ana.segments] == ["media"] and ana.name == "Ana Pérez"

    again = cli("recipients", "add", ANA, "--segment", "media")
    assert again.exit_code == 2 and "in the registry already" in again.output
    empty = cli("recipients", "edit", ANA, "--remove-segment", "media")
    assert empty.exit_code == 2 and "would be in no segment" in empty.output
    bad = cli("recipients", "add", "not an address", "--segment", "media")
    assert bad.exit_code == 2 and "bad address" in bad.output
    unknown = cli("recipients", "add", "b@x.example", "--segment", "nope")
    assert unknown.exit_code == 1 and "no segment 'nope'" in unknown.output
    assert cli("recipients", "edit", "b@x.example", "--name", "B").exit_code == 1


def test_an_opted_out_address_is_not_added_and_remove_lifts_nothing(cli: Cli, db: Database) -> None:
    ok(cli("optout", "add", ANA))
    refused = cli("recipients", "add", ANA, "--segment", "local-police")
    assert refused.exit_code == 2 and "opted out" in refused.output

    ok(cli("recipients", "add", "ben@asociacion.example", "--segment", "associations"))
    with db.session() as s:
        before = s.scalar(select(func.count()).select_from(Suppression))
    assert "removed from the registry" in ok(cli("recipients", "remove", "ben@asociacion.example"))
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Recipient)) == 0
        assert s.scalar(select(func.count()).select_from(Suppression)) == before
    # Not an erasure: the opt-out still stands, and re-adding the removed address works.
    assert cli("recipients", "add", ANA, "--segment", "local-police").exit_code == 2
    ok(cli("recipients", "add", "ben@asociacion.example", "--segment", "associations"))


def _deliveries(db: Database) -> list[tuple[object, ...]]:
    with db.session() as s:
        return [
            tuple(row)
            for row in s.execute(
                select(Delivery.id, Delivery.recipient_id, Delivery.status).order_by(Delivery.id)
            )
        ]


def test_remove_and_segment_delete_keep_the_delivery_log(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    ok(cli("recipients", "add", ANA, "--segment", "local-police"))
    ok(cli("recipients", "add", "eva@policia-elche.example", "--segment", "local-police"))
    ok(cli("send", "newsletter-2022-01", "--segment", "local-police", "--yes"))
    log = _deliveries(db)
    assert len(log) == 2 and all(row[1] is not None for row in log)

    out = ok(cli("recipients", "remove", ANA))
    assert "profile is kept because 1 delivery row(s) refer to it" in out
    assert _deliveries(db) == log
    with db.session() as s:
        ana = s.scalars(select(Recipient).where(Recipient.email == ANA)).one()
        assert ana.segments == []
    assert ANA not in ok(cli("recipients", "list", "--segment", "local-police", "--format", "csv"))

    refused = cli("segments", "delete", "local-police")
    assert refused.exit_code == 2 and "has 1 member(s)" in refused.output
    out = ok(cli("segments", "delete", "local-police", "--force"))
    assert "1 membership(s) dropped" in out
    assert _deliveries(db) == log
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Recipient)) == 2


def test_segments_create_rename_delete_and_list(cli: Cli, db: Database) -> None:
    ok(cli("segments", "create", "press-offices", "--name", "Press offices"))
    assert "press-offices" in ok(cli("segments", "--format", "csv"))
    assert cli("segments", "create", "press-offices").exit_code == 2
    bad = cli("segments", "create", "Press Offices")
    assert bad.exit_code == 2 and "is not a segment name" in bad.output

    ok(cli("recipients", "add", ANA, "--segment", "press-offices"))
    out = ok(cli("segments", "rename", "press-offices", "press", "--name", "Press"))
    assert "is now press (Press, 1 member(s))" in out
    assert "segments press" in ok(cli("recipients", "show", ANA)).replace(":", "")
    assert cli("segments", "rename", "press", "local-police").exit_code == 2  # taken
    assert cli("segments", "rename", "nope", "--name", "x").exit_code == 1
    ok(cli("segments", "rename", "press", "--name", "Press and media"))
    ok(cli("segments", "create", "empty-one"))
    assert "0 membership(s)" in ok(cli("segments", "delete", "empty-one"))
    with db.session() as s:
        assert s.scalar(select(Segment.name).where(Segment.slug == "press")) == "Press and media"
